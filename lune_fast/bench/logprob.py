"""Fused head log-prob op vs torch eager (linear + log_softmax + gather), forward + backward.

    lune-fast bench logprob [--hidden 576] [--vocab 49152] [--n 256,2048,8192] [--dtype float32,bfloat16]
                            [--chunk-mb 64] [--repeats 5] [--json OUT]

Counts 4·N·H·V FLOPs (logits, then the gradient's matmul; eager does the same two). Peak extra memory is
measured as the growth of resident memory over the inputs (CPU) or torch's allocator peak (CUDA). On CUDA a
Liger-style fused linear cross-entropy (liger_kernel, when importable) is timed on the same frozen head.
"""
from __future__ import annotations

import argparse
import gc

import torch

from .harness import machine, markdown_table, median_seconds, write_json
from ..ops import linear_logprob, linear_logprob_reference


def _eager(h, w, y):
    return linear_logprob_reference(h, w, y)


def _measure(fn, h, w, y, repeats: int, device: str):
    g = torch.randn(h.shape[0], device=h.device)

    def step():
        hh = h.detach().requires_grad_()
        (fn(hh, w, y) * g).sum().backward()
        return hh.grad

    sync = torch.cuda.synchronize if device == "cuda" else None
    t = median_seconds(step, repeats, warmup=1, sync=sync)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        from .harness import PeakRSS

        with PeakRSS(interval=0.001) as mem:
            base = PeakRSS.current()
            step()
        extra = mem.peak - base
    return t, extra / 2**20


def _liger(h, w, y):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # per-row loss = -logp; reduction none keeps the same [N] output to weight by g
    return -liger_fused_linear_cross_entropy(h, w, y, reduction="none")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench logprob", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--n", default="256,2048,8192")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--chunk-mb", type=float, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = []
    liger_ok = False
    if a.device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            liger_ok = True
        except ImportError:
            pass
    for dt in a.dtype.split(","):
        dtype = getattr(torch, dt)
        for n in map(int, a.n.split(",")):
            gen = torch.Generator(device="cpu").manual_seed(0)
            h = torch.randn(n, a.hidden, generator=gen).to(a.device, dtype)
            w = (torch.randn(a.vocab, a.hidden, generator=gen) * a.hidden ** -0.5).to(a.device, dtype)
            y = torch.randint(0, a.vocab, (n,), generator=gen).to(a.device)
            kw = {} if a.chunk_mb is None else {"chunk_mb": a.chunk_mb}
            t_f, m_f = _measure(lambda hh, ww, yy: linear_logprob(hh, ww, yy, **kw), h, w, y, a.repeats, a.device)
            t_e, m_e = _measure(_eager, h, w, y, a.repeats, a.device)
            flops = 4 * n * a.hidden * a.vocab
            row = {"dtype": dt, "N": n, "fused_ms": 1e3 * t_f, "eager_ms": 1e3 * t_e, "time_ratio": t_f / t_e,
                   "fused_GFLOP/s": flops / t_f / 1e9, "fused_extra_MB": m_f, "eager_extra_MB": m_e,
                   "memory_ratio": m_f / m_e if m_e > 0 else None,
                   "bound_MB": (2 * n * a.hidden) / 2**20}
            if liger_ok:
                t_l, m_l = _measure(_liger, h, w, y, a.repeats, a.device)
                row.update({"liger_ms": 1e3 * t_l, "liger_ratio": t_l / t_f, "liger_extra_MB": m_l})
            else:
                row["liger_ms"] = "not measured (CUDA + liger_kernel only)"
            rows.append(row)
            del h, w, y
            gc.collect()
    print(machine())
    print(f"H={a.hidden} V={a.vocab} device={a.device}; time_ratio = fused/eager (≤ 1 is the goal); "
          f"bound_MB = 2·N·H bytes")
    print(markdown_table(rows))
    if a.json:
        write_json(a.json, {"machine": machine(), "rows": rows, "hidden": a.hidden, "vocab": a.vocab})
    return 0
