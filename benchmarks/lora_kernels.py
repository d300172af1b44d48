"""Fused LoRA kernels vs the frozen base, PEFT and an Unsloth-style chain (same as `lune-fast bench lora`)."""
import sys

from lune_fast.bench.lora import main

if __name__ == "__main__":
    sys.exit(main())
