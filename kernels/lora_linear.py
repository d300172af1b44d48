"""The LoRA linear op: y = x Wᵀ (+ b) + s·(x Aᵀ) Bᵀ with W frozen — its Triton kernels, the two autograd
Functions (Triton, and the torch addmm chain that CPUs run), the plain torch reference, and the one dispatch
point, `lora_linear(..., backend=)`, in one file. Installed as lune_fast.kernels.lora_linear.

Both Functions save only x (in its own dtype) and x·Aᵀ [N, r] for the backward. Adapter parameters are
float32 master weights; the products run in the activations' dtype (bf16 on AMX / tensor cores).

Forward (one kernel): each program owns a [BM, BN] tile of y; its K loop loads each x tile once and
feeds it to both products, x·Wᵀ into the tile accumulator and x·Aᵀ into a [BM, r] accumulator; the rank-r
term is added in the epilogue as one more tensor-core dot. The programs of the first column tile write
x·Aᵀ (fp32, N×r), the only activation saved besides x itself. Recomputing x·Aᵀ in every column tile costs
r_pad/BN of the main product's FLOPs (16/256 = 6% on Hopper's 128×256 tiles) and saves a second launch
and a second pass over x.

Backward (one kernel): each program owns a [BM, BK] tile of dx; its loop over the output features loads
each dy tile once for dx += dy·W and (dy·B) += dy·B; the epilogue adds s·(dy·B)·A, then reads the x tile
once for this tile's share of dA = s·(dy·B)ᵀ·x. Programs of the first dx column also form
dB = s·dyᵀ·(x·Aᵀ) from the dy tiles they already hold. dA and dB are written as per-row-tile partial sums
and reduced with one torch.sum each: deterministic, no atomics, and no extra pass over x or dy.

The scale s is folded into B before the call (B_s = s·B), so grouped projections that share x (q/k/v,
gate/up) run as ONE kernel over their stacked weights with a block-diagonal B_s (see grouped_lora_linear).
Under TRITON_INTERPRET=1 (CPU tests) bf16 tl.dot is wrong in the interpreter (triton #11584), so operands
are upcast to fp32 there (UPCAST); on a GPU they stay bf16/fp16 for the tensor cores.

Measured on an H200 (benchmarks/RESULTS.md section 7): correct, but the forward kernel takes 1.6-2.6x and the
backward 2.8-4.8x the time of the one cuBLAS product each replaces, so the torch chain (cuBLAS addmm's) is the
default everywhere and these kernels are opt-in (backend="triton").
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the package works without triton; only the CUDA fast path needs it
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return HAVE_TRITON and (torch.cuda.is_available() or interpreting())


def rank_pad(r: int) -> int:
    """tl.dot needs every dimension ≥ 16 and a power of two."""
    return max(16, triton.next_power_of_2(r))


# (BM, BN, BK, warps, stages, largest padded rank) per target and kernel; for the backward, (BN, BK) are
# (dx tile width, reduction chunk). Chosen so that every config compiles without register spills and fits
# shared memory at every rank it admits (tests/test_gpu_build.py checks this from the cubins).
# Hopper: 128x256 forward tiles keep wgmma busy and make the recomputed x·Aᵀ 6% of the work.
CONFIGS = {
    ("hopper", "fwd"): [(128, 256, 64, 8, 3, 64), (128, 128, 64, 8, 4, 64), (64, 128, 64, 4, 4, 64)],
    ("hopper", "bwd"): [(128, 128, 64, 8, 3, 64), (64, 256, 64, 8, 3, 64), (128, 64, 64, 4, 4, 64),
                        (64, 64, 64, 4, 4, 64)],
    ("ampere", "fwd"): [(128, 128, 32, 4, 4, 16), (128, 128, 64, 8, 3, 16), (64, 128, 32, 4, 4, 16),
                        (128, 128, 32, 8, 4, 64), (64, 64, 32, 4, 4, 64)],
    ("ampere", "bwd"): [(128, 128, 32, 8, 4, 16), (64, 128, 32, 4, 3, 16), (64, 64, 32, 4, 4, 64)],
    ("interpreter", "fwd"): [(32, 32, 32, 4, 1, 64)],
    ("interpreter", "bwd"): [(32, 32, 32, 4, 1, 64)],
}


def target_family() -> str:
    if interpreting() or not torch.cuda.is_available():
        return "interpreter"
    return "hopper" if torch.cuda.get_device_capability()[0] >= 9 else "ampere"


def _configs(family: str, kind: str, names: tuple[str, str, str]):
    return [triton.Config(dict(zip(names, c[:3]), GROUP_M=8, MAX_RP=c[5]), num_warps=c[3], num_stages=c[4])
            for c in CONFIGS[(family, kind)]]


def shared_bytes(kind: str, BM: int, BN: int, BK: int, stages: int, rp: int, esize: int) -> int:
    """Shared memory one program needs (kernel names: the backward reduces over BN): each pipeline stage
    holds one loop iteration's operand tiles; the backward also keeps its dB partial. An upper bound on what
    Triton allocates (tests/test_gpu_build.py checks it against the compiler's figure)."""
    if kind == "fwd":  # x [BM, BK], W [BN, BK], A [rp, BK]
        return stages * (BM * BK + BN * BK + rp * BK) * esize
    return (stages * (BM * BN + BN * BK + BN * rp) + 2 * BN * rp) * esize  # dy [BM, BN], W [BN, BK], B [BN, rp]


def shared_limit() -> int | None:
    """The device's shared memory per block (opt-in maximum); None under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 232448 if props.major >= 9 else 166912)


def _fits(configs, named_args, **kwargs):
    """Drop configs that would spill at this rank (their MAX_RP is below the padded rank) or that need more
    shared memory than the device has at these operands' width (fp32 doubles bf16's tiles)."""
    rp = named_args.get("RP", kwargs.get("RP"))
    kind, first = ("bwd", "dy_ptr") if "dy_ptr" in named_args else ("fwd", "x_ptr")
    esize = named_args[first].element_size()
    limit = shared_limit()
    need = {id(c): shared_bytes(kind, c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages, rp, esize)
            for c in configs}
    kept = [c for c in configs if c.kwargs["MAX_RP"] >= rp and (limit is None or need[id(c)] <= limit)]
    if kept:
        return kept
    c = min(configs, key=lambda c: need[id(c)])  # none fits: the smallest tiles, with fewer stages
    stages = c.num_stages
    while stages > 1 and shared_bytes(kind, c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], stages, rp,
                                      esize) > limit:
        stages -= 1
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages)]


if HAVE_TRITON:

    @triton.jit
    def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped ordering: GROUP_M row tiles sweep the columns together so their operands stay in L2."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size
        pid_n = (pid % per_group) // size
        return pid_m, pid_n

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, xa_ptr, M, N, K, R, M_BUCKET,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, RP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    MAX_RP: tl.constexpr):
        pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        rr = tl.arange(0, RP)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        xa = tl.zeros((BM, RP), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            a = tl.load(a_ptr + rr[:, None] * K + kk[None, :], mask=(rr[:, None] < R) & (kk[None, :] < K), other=0.0)
            if UPCAST:
                x, w, a = x.to(tl.float32), w.to(tl.float32), a.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc)
            xa = tl.dot(x, tl.trans(a), xa)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        if UPCAST:
            acc = tl.dot(xa, tl.trans(b.to(tl.float32)), acc)
        else:
            acc = tl.dot(xa.to(b.dtype), tl.trans(b), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
        if pid_n == 0:
            tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa, mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _bwd_kernel(dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, xa_ptr, dx_ptr, pa_ptr, pb_ptr, M, N, K, R, M_BUCKET,
                    UPCAST: tl.constexpr, RP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    MAX_RP: tl.constexpr):
        # tile of dx: rows rm, input features rk; reduction over the N output features in chunks of BN
        pid_m, pid_k = _tile_ids(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rk = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
        rr = tl.arange(0, RP)
        rn0 = tl.arange(0, BN)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        dyb = tl.zeros((BM, RP), dtype=tl.float32)
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        for n0 in range(0, N, BN):
            rn = (n0 + rn0).to(tl.int64)
            dy = tl.load(dy_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
            if UPCAST:
                dy, w, b = dy.to(tl.float32), w.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(dy, w, acc)
            dyb = tl.dot(dy, b, dyb)
            if pid_k == 0:  # dB partial of this row tile: dyᵀ·(x·Aᵀ), from the dy tile already in registers
                pb = tl.dot(tl.trans(dy), xa.to(dy.dtype))
                tl.store(pb_ptr + pid_m.to(tl.int64) * N * RP + rn[:, None] * RP + rr[None, :], pb,
                         mask=rn[:, None] < N)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if UPCAST:
            a, x = a.to(tl.float32), x.to(tl.float32)
        dyb_c = dyb.to(a.dtype)
        acc = tl.dot(dyb_c, a, acc)
        tl.store(dx_ptr + rm[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))
        pa = tl.dot(tl.trans(dyb_c), x)  # this tile's share of dA: (dy·B_s)ᵀ·x, [RP, BK]
        tl.store(pa_ptr + pid_m.to(tl.int64) * RP * K + rr[:, None] * K + rk[None, :], pa, mask=rk[None, :] < K)

    @functools.lru_cache(maxsize=None)
    def _tuned(kind: str, family: str):
        """The kernel wrapped in triton.autotune over the family's configs (one config under the
        interpreter). Keyed on the row-count bucket and the shapes, so a new batch size re-tunes once."""
        prune = {"early_config_prune": _fits}
        if kind == "fwd":
            return triton.autotune(_configs(family, "fwd", ("BM", "BN", "BK")), key=["M_BUCKET", "N", "K", "RP"],
                                   prune_configs_by=prune)(_fwd_kernel)
        # the backward's output tile is [BM, BK] over input features, reduced over N in chunks of BN. The dA/dB
        # partials are one slab per row tile of the smallest BM: a config with a larger BM writes fewer slabs,
        # so the slabs a config benchmarked earlier wrote must be zeroed before the chosen one runs (without
        # this, the first call at a new shape summed stale partials: dA 15% off on an H200)
        return triton.autotune(_configs(family, "bwd", ("BM", "BK", "BN")), key=["M_BUCKET", "N", "K", "RP"],
                               prune_configs_by=prune, reset_to_zero=["pa_ptr", "pb_ptr"])(_bwd_kernel)


def _bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 16))


def forward(x2, w, a, b_s, bias=None, y=None, xa=None):
    """Launch the forward kernel on 2-D contiguous operands. Returns (y [M,N] in x's dtype, xa [M,r] fp32).
    y and xa may be passed in (tests poison them to catch unwritten elements)."""
    M, K = x2.shape
    N, R = w.shape[0], a.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype) if y is None else y
    xa = torch.empty(M, R, device=x2.device, dtype=torch.float32) if xa is None else xa
    kern = _tuned("fwd", target_family())
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    kern[grid](x2, w, a, b_s, bias if bias is not None else y, y, xa, M, N, K, R, _bucket(M),
               HAS_BIAS=bias is not None, UPCAST=interpreting(), RP=rank_pad(R))
    return y, xa


def backward(dy2, x2, xa, w, a, b_s, dx=None):
    """Launch the backward kernel. Returns dx [M,K] (x's dtype), dA_s = (dy·B_s)ᵀx [r,K] fp32 and
    G = dyᵀ·xa [N,r] fp32 (the caller multiplies G by s for dB)."""
    M, K = x2.shape
    N, R = w.shape[0], a.shape[0]
    RP = rank_pad(R)
    family = target_family()
    kern = _tuned("bwd", family)
    dx = torch.empty(M, K, device=x2.device, dtype=x2.dtype) if dx is None else dx
    # partial sums per row tile; sized for the smallest BM of the family (a larger BM leaves rows unused)
    min_bm = min(c[0] for c in CONFIGS[(family, "bwd")])
    tiles = triton.cdiv(M, min_bm)
    pa = torch.zeros(tiles, RP, K, device=x2.device, dtype=torch.float32)
    pb = torch.zeros(tiles, N, RP, device=x2.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, meta["BK"]),)  # noqa: E731
    kern[grid](dy2, w, a, b_s, x2, xa, dx, pa, pb, M, N, K, R, _bucket(M), UPCAST=interpreting(), RP=RP)
    return dx, pa.sum(0)[:R], pb.sum(0)[:, :R]


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
        a = A.to(x.dtype).contiguous()
        b_s = (B * scale).to(x.dtype).contiguous()
        y, xa = forward(x2, weight.contiguous(), a, b_s, bias)
        return _keep(ctx, x2, xa, weight, A, B, scale, x.shape, y)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, A, B = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype).contiguous()
        b_s = (B * ctx.scale).to(x2.dtype).contiguous()
        dx, da, g = backward(dy2, x2, xa, weight.contiguous(), A.to(x2.dtype).contiguous(), b_s)
        return _grads(ctx, dx, da.to(A.dtype), (g * ctx.scale).to(B.dtype))


class LoRALinearTorch(torch.autograd.Function):
    """The CPU path: a chain of addmm's with the same contract (saves x and x·Aᵀ only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ A.to(x.dtype).t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, B.to(x.dtype).t(), alpha=scale)
        return _keep(ctx, x2, xa, weight, A, B, scale, x.shape, y)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, A, B = ctx.saved_tensors
        s, need = ctx.scale, ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dyb = dy2 @ B.to(x2.dtype)
        dx = (dy2 @ weight).addmm_(dyb, A.to(x2.dtype), alpha=s) if need[0] else None
        dA = (dyb.t() @ x2).mul_(s).to(A.dtype) if need[3] else None
        dB = (dy2.t() @ xa).mul_(s).to(B.dtype) if need[4] else None
        return _grads(ctx, dx, dA, dB)


# -- the one dispatch point ----------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "triton")
_FUNCTIONS = {"torch": LoRALinearTorch, "triton": LoRALinearTriton}


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": the torch chain on every device. On an H200 (benchmarks/RESULTS.md section 7) it took 0.47-0.94
    of the Triton kernels' time at every Llama-3 projection shape and made a Llama-3-8B training step 1.47x
    faster, so the kernels are opt-in ("triton") until they beat it. "triton" where it cannot run is an
    error, not a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"LoRA backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend == "triton" and not available():
        raise ValueError("LoRA backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def lora_linear(x, weight, bias, A, B, scale: float, backend: str = "auto"):
    return _FUNCTIONS[resolve_backend(backend, x.device)].apply(x, weight, bias, A, B, scale)


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
