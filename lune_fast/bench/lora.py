"""LoRA linear forward+backward: the fused kernels against the frozen base (the floor) and the baselines.

    lune-fast bench lora [--shapes llama-3-8b|llama-3.2-1b|default|CONFIG.json] [--n 128,512,2048,8192]
                         [--r 8,16,64] [--dtype bfloat16] [--repeats 20] [--json OUT]

Per projection shape (in -> out) of the model, for each N tokens and rank r, one training step of a linear
layer: y = x Wᵀ + s (x Aᵀ) Bᵀ forward, then dx, dA, dB backward (W frozen: no dW). Variants, same process:
- base: the frozen linear alone, forward + dgrad (cuBLAS / oneDNN) — the floor the LoRA term adds to;
- lune_fast: the default backend ("auto": the torch autograd.Function, an addmm chain that saves x and x·Aᵀ
  only, on every device);
- lune_triton (CUDA only): the fused Triton kernels (backend="triton");
- peft_default: PEFT's math with fp32 adapters (x cast up to the adapter dtype, result cast back);
- peft_bf16: PEFT's math with adapters in the activations' dtype;
- chain: an Unsloth-style cuBLAS chain (addmm with the LoRA term folded in, in-place dx), written here.
FLOPs counted: 4·N·in·out (forward + dgrad) + 12·N·r·(in+out)/2 for the rank-r products; bytes: x, W, y,
dy, dx once each. The floor is the larger of FLOPs / measured matmul rate and bytes / measured bandwidth.
On CUDA, fwd_vs_cublas / dx_vs_cublas time each Triton GEMM against the cuBLAS product it replaces,
plain_vs_cublas the same persistent TMA GEMM without the rank-r term, *_us the memory-bound launches; a second
table times grouped q+k+v and gate+up as one op (the trainer's grouping with the Triton backend).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .harness import machine, markdown_table, median_seconds, write_json

NAMED = {
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "num_hidden_layers": 32},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256, "num_hidden_layers": 16},
    "default": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "num_hidden_layers": 30},
}


def model_shapes(spec: str) -> dict:
    if spec in NAMED:
        return dict(NAMED[spec])
    d = json.loads(Path(spec).read_text())
    return {k: d[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                              "num_hidden_layers")} | {"num_key_value_heads": d.get("num_key_value_heads") or
                                                       d["num_attention_heads"]}


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, m), "down": (m, h)}


# -- variants: each returns a function doing one fwd+bwd step ------------------------------------------------
def _base(x, w, A, B, s, dy):
    def step():
        xx = x.detach().requires_grad_()
        torch.nn.functional.linear(xx, w).backward(dy)
    return step


def _lune(backend: str):
    def make(x, w, A, B, s, dy):
        from ..lora import lora_linear

        def step():
            xx = x.detach().requires_grad_()
            lora_linear(xx, w, None, A, B, s, backend=backend).backward(dy)
        return step
    return make


def _peft(adapter_dtype):
    def make(x, w, A, B, s, dy):
        Ad = A.detach().to(adapter_dtype).requires_grad_()
        Bd = B.detach().to(adapter_dtype).requires_grad_()

        def step():  # PEFT's Linear.forward: result = base(x); result += lora_B(lora_A(dropout(x))) * scaling
            xx = x.detach().requires_grad_()
            y = torch.nn.functional.linear(xx, w)
            xa = xx.to(Ad.dtype)
            y = y + (torch.nn.functional.linear(torch.nn.functional.linear(xa, Ad), Bd) * s).to(y.dtype)
            y.backward(dy)
        return step
    return make


class _Chain(torch.autograd.Function):
    """Unsloth-style: addmm with the LoRA term folded in through cuBLAS's beta/alpha, dx built in place."""

    @staticmethod
    def forward(ctx, x, w, A, B, s):
        a, b = A.to(x.dtype), B.to(x.dtype)
        xa = x @ a.t()
        y = torch.addmm(x @ w.t(), xa, b.t(), alpha=s)
        ctx.save_for_backward(x, w, a, b)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b = ctx.saved_tensors
        s = ctx.s
        dyb = dy @ b
        dx = dy @ w
        dx.addmm_(dyb, a, alpha=s)
        dA = (dyb.t() @ x).mul_(s)
        dB = (dy.t() @ (x @ a.t())).mul_(s)  # x·Aᵀ recomputed, not saved (Unsloth's choice)
        return dx, None, dA.float(), dB.float(), None


def _chain(x, w, A, B, s, dy):
    def step():
        xx = x.detach().requires_grad_()
        _Chain.apply(xx, w, A, B, s).backward(dy)
    return step


VARIANTS = {"base": _base, "lune_fast": _lune("auto"), "peft_default": _peft(torch.float32), "peft_bf16": None,
            "chain": _chain}


def kernel_split(x, w, A, B, s, dy, repeats: int) -> dict:
    """On CUDA: each launch of the Triton path timed alone. The two GEMMs against the cuBLAS product each
    replaces (x·Wᵀ; dy·W), the plain Triton GEMM (no rank-r term) against x·Wᵀ, and the three memory-bound
    launches (shrink, dy pass, dA) as microseconds, so a gap can be placed in one kernel."""
    from ..kernels import lora_linear as K

    sync = torch.cuda.synchronize if x.is_cuda else None  # None: tests run it under the interpreter
    a, b_s = K.pad_rank(A.detach(), B.detach() * s, x.dtype)
    _, S = K.forward(x, w, a, b_s)
    ds, _ = K.dy_pass(dy, b_s, S)
    fns = {"shrink": lambda: K.shrink(x, a), "fwd": lambda: K.gemm(x, w, S, b_s), "plain": lambda: K.gemm(x, w),
           "fwd_cublas": lambda: x @ w.t(), "dy": lambda: K.dy_pass(dy, b_s, S),
           "dx": lambda: K.gemm(dy, w, ds, a, trans_b=False, trans_q=False), "dx_cublas": lambda: dy @ w,
           "ds_x": lambda: K.ds_x(ds, x)}
    t = {k: median_seconds(f, repeats, 2, sync) for k, f in fns.items()}
    return {"fwd_vs_cublas": t["fwd"] / t["fwd_cublas"], "dx_vs_cublas": t["dx"] / t["dx_cublas"],
            "plain_vs_cublas": t["plain"] / t["fwd_cublas"],
            "shrink_us": 1e6 * t["shrink"], "dy_us": 1e6 * t["dy"], "ds_x_us": 1e6 * t["ds_x"]}


def grouped_rows(cfg: dict, n: int, r: int, dtype, dev: str, repeats: int, sync) -> list[dict]:
    """q/k/v and gate/up as the trainer runs them with the Triton backend: one op over the stacked weights
    (one read of x for every adapter), against the stacked frozen linear and against the torch chain run per
    projection (what backend "torch" does)."""
    from ..kernels.lora_linear import grouped_lora_linear, lora_linear

    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    rows = []
    for name, outs in (("q+k+v", (h, kv, kv)), ("gate+up", (m, m))):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(n, h, generator=g).to(dev, dtype)
        ws = [(torch.randn(o, h, generator=g) * h ** -0.5).to(dev, dtype) for o in outs]
        w_cat = torch.cat(ws)
        As = [(torch.randn(r, h, generator=g) * 0.01).to(dev).requires_grad_() for _ in outs]
        Bs = [(torch.randn(o, r, generator=g) * 0.01).to(dev).requires_grad_() for o in outs]
        dys = [torch.randn(n, o, generator=g).to(dev, dtype) for o in outs]
        dy_cat = torch.cat(dys, 1)

        def base():
            xx = x.detach().requires_grad_()
            torch.nn.functional.linear(xx, w_cat).backward(dy_cat)

        def grouped(backend):
            def step():
                xx = x.detach().requires_grad_()
                ys = grouped_lora_linear(xx, w_cat, None, As, Bs, [2.0] * len(outs), outs, backend=backend)
                torch.autograd.backward(ys, dys)
            return step

        def separate():
            xx = x.detach().requires_grad_()
            ys = [lora_linear(xx, w, None, A, B, 2.0, backend="torch") for w, A, B in zip(ws, As, Bs)]
            torch.autograd.backward(ys, dys)

        t = {k: median_seconds(f, repeats, 2, sync) for k, f in
             (("base", base), ("triton", grouped("triton")), ("chain", separate))}
        rows.append({"proj": name, "in": h, "out": sum(outs), "N": n, "r": r, "base_ms": 1e3 * t["base"],
                     "triton_vs_base": t["triton"] / t["base"], "chain_vs_base": t["chain"] / t["base"],
                     "chain_over_triton": t["chain"] / t["triton"]})
    return rows


def measure_rates(device: str, dtype) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s) measured here: a large matrix product and a large copy."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)  # random, never zeros: zeros multiply faster
    sync = torch.cuda.synchronize if device == "cuda" else None
    t = median_seconds(lambda: a @ a, 5, 2, sync)
    flops = 2 * n ** 3 / t
    # the copy must be several times the last-level cache (60 MB L2 on an H200) to measure memory, not cache
    big = torch.empty(2**30 if device == "cuda" else 16 * 2**20, device=device, dtype=torch.uint8)
    out = torch.empty_like(big)
    t = median_seconds(lambda: out.copy_(big), 10, 2, sync)
    return flops, 2 * big.numel() / t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default")
    ap.add_argument("--n", default="128,512,2048")
    ap.add_argument("--r", default="8,16,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    cfg = model_shapes(a.shapes)
    dev = a.device
    flops_rate, bw = measure_rates(dev, dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    variants = dict(VARIANTS, peft_bf16=_peft(dtype), **({"lune_triton": _lune("triton")} if dev == "cuda" else {}))
    rows = []
    for name, (din, dout) in projections(cfg).items():
        for n in map(int, a.n.split(",")):
            for r in map(int, a.r.split(",")):
                g = torch.Generator(device="cpu").manual_seed(0)
                x = torch.randn(n, din, generator=g).to(dev, dtype)
                w = (torch.randn(dout, din, generator=g) * din ** -0.5).to(dev, dtype)
                A = (torch.randn(r, din, generator=g) * 0.01).to(dev).requires_grad_()
                B = (torch.randn(dout, r, generator=g) * 0.01).to(dev).requires_grad_()
                dy = torch.randn(n, dout, generator=g).to(dev, dtype)
                times = {v: median_seconds(make(x, w, A, B, 2.0, dy), a.repeats, 2, sync)
                         for v, make in variants.items()}
                esz = torch.finfo(dtype).bits // 8
                flops = 4 * n * din * dout + 6 * n * r * (din + dout)
                nbytes = esz * (2 * n * din + din * dout + 2 * n * dout)
                floor = max(flops / flops_rate, nbytes / bw)
                t = times["lune_fast"]
                rows.append({"proj": name, "in": din, "out": dout, "N": n, "r": r,
                             "lune_ms": 1e3 * t, "base_ms": 1e3 * times["base"],
                             "vs_base": t / times["base"], "TFLOP/s": flops / t / 1e12, "vs_floor": t / floor,
                             "triton_vs_base": times["lune_triton"] / times["base"] if "lune_triton" in times
                             else None,
                             "triton_x": times["lune_triton"] / t if "lune_triton" in times else None,
                             "peft_default_x": times["peft_default"] / t,
                             "peft_bf16_x": times["peft_bf16"] / t, "chain_x": times["chain"] / t}
                            | (kernel_split(x, w, A, B, 2.0, dy, a.repeats) if dev == "cuda" else {}))
    grouped = [row for n in map(int, a.n.split(",")) for r in map(int, a.r.split(","))
               for row in grouped_rows(cfg, n, r, dtype, dev, a.repeats, sync)] if dev == "cuda" else []
    info = machine()
    print(info)
    print(f"device {dev}, {a.dtype}; measured matmul {flops_rate / 1e12:.2f} TFLOP/s, copy {bw / 1e9:.0f} GB/s. "
          f"vs_base = lune/base (1.10 goal at N>=2048); *_x = baseline time / lune time (higher is better)")
    if dev != "cuda":
        print("GPU columns not measured: on CPU 'lune_fast' is the torch autograd.Function, not the Triton kernels")
    print(markdown_table(rows))
    if grouped:
        print("\ngrouped projections (one op over the stacked weights): triton_vs_base, chain_vs_base (per "
              "projection torch chain) and chain_over_triton (> 1: the kernels win)")
        print(markdown_table(grouped))
    if a.json:
        write_json(a.json, {"machine": info, "device": dev, "dtype": a.dtype, "shapes": a.shapes,
                            "matmul_flops": flops_rate, "bandwidth": bw, "rows": rows, "grouped": grouped})
    return 0
