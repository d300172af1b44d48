"""Our frozen forward vs transformers' forward on the same weights, same process.

    lune-fast bench forward [--batch 8] [--seq 64] [--repeats 7] [--model default] [--json OUT]
"""
from __future__ import annotations

import argparse

import torch

from .harness import median_seconds, report
from ..weights import load_model, resolve_model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench forward", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="default")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(a.model)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (a.batch, a.seq))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(folder, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        with torch.inference_mode():
            # alternate the two so that drifting machine load hits both alike
            t_hf, t_ours = [], []
            for _ in range(3):
                t_hf.append(median_seconds(lambda: hf(ids).logits, a.repeats, warmup=1))
                t_ours.append(median_seconds(lambda: ours(ids), a.repeats, warmup=1))
        t_h, t_o = sorted(t_hf)[1], sorted(t_ours)[1]
        rows.append({"dtype": str(dtype).replace("torch.", ""), "transformers_ms": 1e3 * t_h,
                     "lune_fast_ms": 1e3 * t_o, "ratio (hf/ours)": t_h / t_o})
        ours = hf = None  # free both before the next dtype loads
    report(f"forward, batch {a.batch} x {a.seq} tokens, full logits, median of {a.repeats} (x3 alternating)", rows,
           a.json)
    return 0
