"""Fused head log-prob op vs eager (same as `lune-fast bench logprob`)."""
import sys

from lune_fast.bench.logprob import main

if __name__ == "__main__":
    sys.exit(main())
