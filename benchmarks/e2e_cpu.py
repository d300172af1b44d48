"""End-to-end unlearning: lune_fast vs HF+PEFT vs full fine-tuning (same as `lune-fast bench e2e`)."""
import sys

from lune_fast.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
