"""The LoRA linear op: y = x Wᵀ (+ b) + s·(x Aᵀ) Bᵀ with W frozen — its Triton kernels, the two autograd
Functions (Triton, and the torch addmm chain that CPUs run), the plain torch reference, and the one dispatch
point, `lora_linear(..., backend=)`, in one file. Installed as lune_fast.kernels.lora_linear.

No rank-r dot sits inside a main loop (why: kernels/tma_gemm.py's docstring). Five launches a step:
  forward   S  = x·A_padᵀ                  shrink_kernel: one memory-bound pass over x, S [M, r] float32 saved
            y  = x·Wᵀ + S·(sB)ᵀ (+ b)      tma_gemm.gemm: the rank-r dot once per tile, after the K loop
  backward  dS = dy·(sB), G = dyᵀ·S        dy_kernel: ONE read of dy for both; G summed over row tiles with
                                           fp32 atomics, or as per-tile partials when torch's deterministic
                                           algorithms are on (the same bits every run)
            dx = dy·W + dS·A_pad           tma_gemm.gemm, same kernel, W read untransposed
            dA = dSᵀ·x                     ds_x_kernel: partial sums over row chunks, summed once
dB = s·G. Saved for the backward: x (its own dtype) and S, nothing else. The rank is padded to a power of two
≥ 16 (A's rows, B's columns: zeros), which tl.dot and TMA's 16-byte rows need.

The scale s is folded into B before the call (B_s = s·B), so grouped projections that share x (q/k/v,
gate/up) run as ONE op over their stacked weights with a block-diagonal B_s (grouped_lora_linear): one shrink
pass reads x once for all their adapters. Under TRITON_INTERPRET=1 (CPU tests) bf16 tl.dot is wrong in the
interpreter (triton #11584), so operands are upcast to fp32 there (UPCAST); on a GPU they stay bf16/fp16.

Operands TMA cannot address (a feature count whose rows are not a multiple of 16 bytes) run the torch chain.
Which backend is the default is decided by measurement (resolve_backend; benchmarks/RESULTS.md section 7).
"""
from __future__ import annotations

import functools

import torch

from .tma_gemm import HAVE_TRITON, gemm, interpreting, set_allocator, target_family, tma_compatible

if HAVE_TRITON:
    import triton
    import triton.language as tl


def available() -> bool:
    return HAVE_TRITON and (torch.cuda.is_available() or interpreting())


def rank_pad(r: int) -> int:
    """tl.dot needs every dimension ≥ 16 and a power of two."""
    return max(16, 1 << max(r - 1, 0).bit_length())


# The three memory-bound kernels run one config per target: (BM, BN or BK, warps, stages); ds_x adds the rows
# a program sums over (its partials are few: M / ROWS slabs of [r, K]).
SMALL = {
    "hopper": {"shrink": (64, 128, 4, 3), "dy": (128, 128, 8, 3), "ds_x": (128, 128, 8, 3, 1024)},
    "ampere": {"shrink": (64, 64, 4, 3), "dy": (64, 64, 4, 3), "ds_x": (64, 128, 4, 3, 1024)},
    "interpreter": {"shrink": (32, 32, 4, 1), "dy": (32, 32, 4, 1), "ds_x": (32, 32, 4, 1, 64)},
}


if HAVE_TRITON:

    @triton.jit
    def shrink_kernel(x_ptr, a_ptr, s_ptr, M, K, UPCAST: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                      BK: tl.constexpr):
        """S[rows] = x[rows]·A_padᵀ in float32: each program reads its rows of x once."""
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[RP, K], strides=[K, 1], block_shape=[RP, BK])
        s_desc = tl.make_tensor_descriptor(s_ptr, shape=[M, RP], strides=[RP, 1], block_shape=[BM, RP])
        om = tl.program_id(0) * BM
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BK)):
            x = x_desc.load([om, ki * BK])
            a = a_desc.load([0, ki * BK])
            if UPCAST:
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc = tl.dot(x, a.T, acc)
        s_desc.store([om, 0], acc)

    @triton.jit
    def dy_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, g_ptr, M, N, UPCAST: tl.constexpr, ATOMIC: tl.constexpr,
                  RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """One pass over dy: dS[rows] = dy[rows]·B_s (float32) and G += dy[rows]ᵀ·S[rows] for every column
        chunk, added into G [N, r] (ATOMIC) or written as this row tile's partial slab of [tiles, N, r]."""
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, RP], strides=[RP, 1], block_shape=[BN, RP])
        s_desc = tl.make_tensor_descriptor(s_ptr, shape=[M, RP], strides=[RP, 1], block_shape=[BM, RP])
        ds_desc = tl.make_tensor_descriptor(ds_ptr, shape=[M, RP], strides=[RP, 1], block_shape=[BM, RP])
        pid = tl.program_id(0)
        om = pid * BM
        s = s_desc.load([om, 0])
        rr = tl.arange(0, RP)
        g_base = g_ptr if ATOMIC else g_ptr + pid.to(tl.int64) * N * RP
        ds = tl.zeros((BM, RP), dtype=tl.float32)
        for ni in range(tl.cdiv(N, BN)):
            dy = dy_desc.load([om, ni * BN])
            b = b_desc.load([ni * BN, 0])
            if UPCAST:
                dy, b, s_c = dy.to(tl.float32), b.to(tl.float32), s
            else:
                s_c = s.to(dy.dtype)
            ds = tl.dot(dy, b, ds)
            g = tl.dot(dy.T, s_c)
            rn = ni * BN + tl.arange(0, BN)
            ptrs = g_base + rn[:, None] * RP + rr[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, g, mask=rn[:, None] < N)
            else:
                tl.store(ptrs, g, mask=rn[:, None] < N)
        ds_desc.store([om, 0], ds)

    @triton.jit
    def ds_x_kernel(ds_ptr, x_ptr, pa_ptr, M, K, UPCAST: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                    BK: tl.constexpr, ROWS: tl.constexpr):
        """This row chunk's share of dA = dSᵀ·x for one column tile of x, written as a partial [r, BK]."""
        ds_desc = tl.make_tensor_descriptor(ds_ptr, shape=[M, RP], strides=[RP, 1], block_shape=[BM, RP])
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        pa_desc = tl.make_tensor_descriptor(pa_ptr, shape=[tl.cdiv(M, ROWS) * RP, K], strides=[K, 1],
                                            block_shape=[RP, BK])
        ok = tl.program_id(0) * BK
        chunk = tl.program_id(1)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for mi in range(ROWS // BM):
            om = chunk * ROWS + mi * BM
            x = x_desc.load([om, ok])
            ds = ds_desc.load([om, 0])
            if UPCAST:
                acc = tl.dot(ds.T, x.to(tl.float32), acc)
            else:
                acc = tl.dot(ds.to(x.dtype).T, x, acc)
        pa_desc.store([chunk * RP, ok], acc)


def _small(kind: str):
    return SMALL[target_family()][kind]


def shrink(x2, a_pad, s=None):
    """S = x·A_padᵀ, float32 [M, r_pad]."""
    M, K = x2.shape
    RP = a_pad.shape[0]
    s = torch.empty(M, RP, device=x2.device, dtype=torch.float32) if s is None else s
    BM, BK, warps, stages = _small("shrink")
    set_allocator()
    shrink_kernel[(triton.cdiv(M, BM),)](x2, a_pad, s, M, K, UPCAST=interpreting(), RP=RP, BM=BM, BK=BK,
                                          num_warps=warps, num_stages=stages)
    return s


def dy_pass(dy2, bs_pad, s, deterministic: bool | None = None, ds=None):
    """(dS = dy·B_s float32 [M, r_pad], G = dyᵀ·S float32 [N, r_pad]) from one read of dy."""
    M, N = dy2.shape
    RP = bs_pad.shape[1]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    BM, BN, warps, stages = _small("dy")
    tiles = triton.cdiv(M, BM)
    ds = torch.empty(M, RP, device=dy2.device, dtype=torch.float32) if ds is None else ds
    g = torch.empty(tiles, N, RP, device=dy2.device, dtype=torch.float32) if deterministic else \
        torch.zeros(N, RP, device=dy2.device, dtype=torch.float32)
    set_allocator()
    dy_kernel[(tiles,)](dy2, bs_pad, s, ds, g, M, N, UPCAST=interpreting(), ATOMIC=not deterministic, RP=RP,
                        BM=BM, BN=BN, num_warps=warps, num_stages=stages)
    return ds, (g.sum(0) if deterministic else g)


def ds_x(ds, x2):
    """dA_pad = dSᵀ·x, float32 [r_pad, K]: partial sums over row chunks, then one sum (deterministic)."""
    M, K = x2.shape
    RP = ds.shape[1]
    BM, BK, warps, stages, rows = _small("ds_x")
    chunks = triton.cdiv(M, rows)
    pa = torch.empty(chunks * RP, K, device=x2.device, dtype=torch.float32)
    set_allocator()
    ds_x_kernel[(triton.cdiv(K, BK), chunks)](ds, x2, pa, M, K, UPCAST=interpreting(), RP=RP, BM=BM, BK=BK,
                                              ROWS=rows, num_warps=warps, num_stages=stages)
    return pa.view(chunks, RP, K).sum(0)


def pad_rank(A, B_s, dtype):
    """A [r, K] and B_s [N, r] in the activations' dtype, their rank padded with zeros to rank_pad(r)."""
    r = A.shape[0]
    RP = rank_pad(r)
    a = torch.zeros(RP, A.shape[1], device=A.device, dtype=dtype)
    a[:r] = A
    b = torch.zeros(B_s.shape[0], RP, device=B_s.device, dtype=dtype)
    b[:, :r] = B_s
    return a, b


def forward(x2, w, a_pad, bs_pad, bias=None, y=None, s=None):
    """The forward's two launches on 2-D contiguous operands. Returns (y [M,N] in x's dtype, S [M,r_pad]
    float32). y and s may be passed in (tests poison them to catch unwritten elements)."""
    s = shrink(x2, a_pad, s)
    return gemm(x2, w, s, bs_pad, bias, trans_b=True, trans_q=True, out=y), s


def backward(dy2, x2, s, w, a_pad, bs_pad, dx=None, deterministic: bool | None = None):
    """The backward's three launches. Returns dx [M,K] (x's dtype), dA_s = (dy·B_s)ᵀx [r_pad,K] float32 and
    G = dyᵀ·S [N,r_pad] float32 (the caller multiplies G by s for dB)."""
    ds, g = dy_pass(dy2, bs_pad, s, deterministic)
    dx = gemm(dy2, w, ds, a_pad, trans_b=False, trans_q=False, out=dx)
    return dx, ds_x(ds, x2), g


def _keep(ctx, x2, xa, weight, A, B, scale, shape, y):
    """What both Functions save for the backward (x as rows, x·Aᵀ, the operands); y back in x's shape."""
    ctx.save_for_backward(x2, xa, weight, A, B)
    ctx.scale, ctx.shape = scale, shape
    return y.view(*shape[:-1], weight.shape[0])


def _grads(ctx, dx, dA, dB):
    """The backward's outputs, None where no gradient was asked for."""
    need = ctx.needs_input_grad
    return (dx.view(ctx.shape) if need[0] else None, None, None, dA if need[3] else None,
            dB if need[4] else None, None)


class LoRALinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        a, b_s = pad_rank(A, B * scale, x.dtype)
        y, s = forward(x2, weight.contiguous(), a, b_s, bias)
        return _keep(ctx, x2, s, weight, A, B, scale, x.shape, y)

    @staticmethod
    def backward(ctx, dy):
        x2, s, weight, A, B = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype).contiguous()
        a, b_s = pad_rank(A, B * ctx.scale, x2.dtype)
        dx, da, g = backward(dy2, x2, s, weight.contiguous(), a, b_s)
        r = A.shape[0]
        return _grads(ctx, dx, da[:r].to(A.dtype), (g[:, :r] * ctx.scale).to(B.dtype))


class LoRALinearTorch(torch.autograd.Function):
    """The CPU path: a chain of addmm's with the same contract (saves x and x·Aᵀ only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ A.to(x.dtype).t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, B.to(x.dtype).t(), alpha=scale)
        # x is only read by dA: a keyed adapter's A is fixed, and keeping x would cost a row of in_features a token
        return _keep(ctx, x2 if ctx.needs_input_grad[3] else None, xa, weight, A, B, scale, x.shape, y)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, A, B = ctx.saved_tensors
        s, need = ctx.scale, ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(xa.dtype)
        dyb = dy2 @ B.to(xa.dtype)
        dx = (dy2 @ weight).addmm_(dyb, A.to(xa.dtype), alpha=s) if need[0] else None
        dA = (dyb.t() @ x2).mul_(s).to(A.dtype) if need[3] else None
        dB = (dy2.t() @ xa).mul_(s).to(B.dtype) if need[4] else None
        return _grads(ctx, dx, dA, dB)


# -- the one dispatch point ----------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "triton")
_FUNCTIONS = {"torch": LoRALinearTorch, "triton": LoRALinearTriton}


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": the torch chain on every device, until a GPU measurement says otherwise. The first fused
    kernels lost to it on an H200 at every Llama-3 projection shape (RESULTS.md section 7's table); the
    decomposed kernels in this file have not been timed on a GPU yet — benchmarks/gpu_suite.sh does, and
    "auto" moves to them where they win. "triton" where it cannot run is an error, not a silent
    fallback (operands TMA cannot address do run the chain: lora_linear)."""
    if backend not in BACKENDS:
        raise ValueError(f"LoRA backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend == "triton" and not available():
        raise ValueError("LoRA backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def tma_ready(x, weight) -> bool:
    """Whether the Triton kernels can address these operands: 16-byte aligned bases and feature counts whose
    rows are a multiple of 16 bytes (every Llama-family projection is; a test shape of 45 features is not)."""
    rows = lambda n: (n * x.element_size()) % 16 == 0  # noqa: E731
    return rows(x.shape[-1]) and rows(weight.shape[0]) and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


def lora_linear(x, weight, bias, A, B, scale: float, backend: str = "auto"):
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and not tma_ready(x, weight):
        backend = "torch"
    return _FUNCTIONS[backend].apply(x, weight, bias, A, B, scale)


def grouped_lora_linear(x, weight_cat, bias_cat, As, Bs, scales, splits, backend: str = "auto"):
    """Projections that share x (q/k/v, gate/up) as ONE op: weight_cat is their stacked frozen weights
    [ΣN_i, K] (contiguous), As/Bs their adapters. The stacked A is [Σr_i, K]; the block-diagonal B_s places
    s_i·B_i in its own rank columns, so one epilogue dot adds every adapter's term. Returns the outputs
    split per projection. Differentiable through A_i and B_i (the stacking ops are tracked by autograd)."""
    a_cat = torch.cat(list(As), 0)
    cols = sum(b.shape[1] for b in Bs)
    blocks, c0 = [], 0
    for b, s in zip(Bs, scales):
        blocks.append(torch.nn.functional.pad(b * s, (c0, cols - c0 - b.shape[1])))
        c0 += b.shape[1]
    y = lora_linear(x, weight_cat, bias_cat, a_cat, torch.cat(blocks, 0), 1.0, backend)
    return y.split(list(splits), dim=-1)


def lora_linear_reference(x, weight, bias, A, B, scale: float):
    """Plain torch: what every path must equal."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scale * (x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()
