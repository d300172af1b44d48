"""Forgetting/locality frontier over settings (same as `lune-fast bench quality`)."""
import sys

from lune_fast.bench.quality import main

if __name__ == "__main__":
    sys.exit(main())
