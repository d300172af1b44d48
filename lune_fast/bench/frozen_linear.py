"""The frozen projections' product: the call the model makes (`frozen_linear`: bf16 at up to FEW_ROWS rows the
few-rows dot product, else oneDNN's prepacked weights; its checks and its lookup of the kept copy included; in
float32 F.linear where the rule there says so) and oneDNN's packed product alone, against torch's F.linear (bf16,
or float32 with --dtype), in the same process, on one model's shapes, at the row counts unlearning runs.

    lune-fast bench frozen-linear [--shapes default] [--dtype bfloat16] [--rows 1,8,64,256] [--repeats 7]
                                 [--json OUT]

Each call reads a different copy of the weight, cycled over 512 MiB of copies (more than any last-level cache),
so that the weight comes from memory as it does in a forward of the whole model (a weight read twice in a row
sits in the cache); each variant is warmed up over the whole pool first (oneDNN builds its primitives then).
Floor: at a few rows the product is bound by reading the weight (out × in × 2 bytes); GB/s is that size over
the time, to set against the machine's memory bandwidth; at many rows, by the FLOPs (2 × rows × out × in).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from .harness import median_seconds, report
from .lora import model_shapes, projections

POOL_BYTES = 512 * 2**20


def _cycled(fn, copies: list):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(copies)
        fn(copies[state["i"]])
    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench frozen-linear", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--rows", default="1,8,64,256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from ..kernels.frozen_linear import _packed_product, frozen_linear, packed_weight, packing_supported

    dtype = getattr(torch, a.dtype)
    if not packing_supported(dtype):
        print(f"oneDNN cannot prepack {a.dtype} weights on this CPU (or under this ISA limit): nothing to compare")
        return 0
    size = dtype.itemsize
    cfg = model_shapes(a.shapes)
    shapes = {**projections(cfg), "head": (cfg["hidden_size"], cfg["vocab_size"])}
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for name, (in_f, out_f) in shapes.items():
        n_copies = max(2, POOL_BYTES // (in_f * out_f * size))
        weights = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(n_copies)]
        for w in weights:
            packed_weight(w)  # kept on the weight, as the model keeps it
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, in_f, generator=g).to(dtype)
            plain = _cycled(lambda w: torch.nn.functional.linear(x, w), weights)
            variants = {"plain": plain, "packed": _cycled(lambda w: _packed_product(x, packed_weight(w), None), weights),
                        "model": _cycled(lambda w: frozen_linear(x, w), weights)}
            # alternate them, rounds of repeats, so that drifting load hits all alike
            t = {k: [] for k in variants}
            for _ in range(a.rounds):
                for k, fn in variants.items():
                    t[k].append(median_seconds(fn, a.repeats, len(weights)))
            tp, tk, tm = (statistics.median(t[k]) for k in variants)
            rows_out.append({"proj": name, "out x in": f"{out_f}x{in_f}", "rows": rows,
                             "F.linear_us": round(1e6 * tp, 1), "packed_us": round(1e6 * tk, 1),
                             "model_us": round(1e6 * tm, 1), "speedup": round(tp / tm, 2),
                             "model_GB/s": round(out_f * in_f * size / tm / 1e9, 1),
                             "model_GFLOP/s": round(2 * rows * out_f * in_f / tm / 1e9, 1)})
        del weights
    report(f"{a.shapes} shapes, {a.dtype}, weights cycled over {POOL_BYTES >> 20} MiB of copies", rows_out, a.json)
    return 0
