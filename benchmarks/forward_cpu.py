"""Our forward vs transformers' forward on SmolLM2-135M (same as `lune-fast bench forward`)."""
import sys

from lune_fast.bench.forward import main

if __name__ == "__main__":
    sys.exit(main())
