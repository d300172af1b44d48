"""Our frozen forward vs transformers' forward on the default model (SmolLM2-135M), same process.

    python benchmarks/forward_cpu.py [--batch 8] [--seq 64] [--repeats 7]
"""
import argparse

import torch

from lune_fast.benchmarking import machine, markdown_table, median_seconds
from lune_fast.weights import default_model_dir, load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    folder = default_model_dir()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(folder, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        with torch.inference_mode():
            t_hf = median_seconds(lambda: hf(ids).logits, args.repeats, warmup=2)
            t_ours = median_seconds(lambda: ours(ids), args.repeats, warmup=2)
        rows.append({"dtype": str(dtype).replace("torch.", ""), "transformers_ms": 1e3 * t_hf,
                     "lune_fast_ms": 1e3 * t_ours, "ratio (hf/ours)": t_hf / t_ours})
        del ours, hf
    print(machine())
    print(f"forward, batch {args.batch} x {args.seq} tokens, median of {args.repeats}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
