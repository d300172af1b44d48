"""C = A·op(B) [+ P·op(Q)] [+ bias]: a GEMM read through tensor descriptors (TMA on Hopper), persistent or
one tile a program, with an optional rank-r term added once per output tile after the K loop — its Triton
kernel, the launcher with its autotuned configs, and the plain torch reference. Installed as
lune_fast.kernels.tma_gemm.

The fused LoRA op runs both of its large products through this kernel (lora_linear.py):
  forward  y  = x·Wᵀ + S·(sB)ᵀ      A = x [M,K], B = W stored [N,K] (TRANS_B), P = S [M,r], Q = sB stored [N,r]
  backward dx = dy·W + dS·A_lora    A = dy [M,N], B = W stored [N,K] read as [K-major], P = dS, Q = A_lora [r,K]
With HAS_LOWRANK off it is a plain GEMM, the kernel that `bench lora` holds against cuBLAS.

Why this shape (../shared/research notes, triton #3301 #3327 #6825): the K loop holds exactly one dot and no
branch, so Triton software-pipelines it and keeps Hopper's wgmma asynchronous; the rank-r dot runs once per
tile, after the loop, on an accumulator the loop has finished. P is float32 (the saved S or dS) and is cast to
Q's dtype for the tensor cores. All operands are contiguous rows, 16-byte aligned with row strides a multiple of
16 bytes (TMA's rules; `tma_compatible` checks, and the LoRA op falls back to the torch chain otherwise).

Under TRITON_INTERPRET=1, bf16 tl.dot multiplies raw bit patterns (triton #11584): UPCAST turns the operands
to float32 first, there only.
"""
from __future__ import annotations

import functools
import os
import sys

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_can_run() -> bool:
    """Triton runs these kernels on a CUDA device or under its interpreter. Elsewhere importing it buys nothing
    and costs 73 MB of resident memory and ~0.1 s at `import lune_fast` (Intel Xeon, 2 cores); a caller that
    imported it itself (the kernel compile check, bench/kernel_build.py, builds PTX with no GPU) gets the
    kernels."""
    return interpreting() or "triton" in sys.modules or torch.cuda.is_available()


try:
    if not _triton_can_run():
        raise ImportError("no CUDA device and no TRITON_INTERPRET=1")
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the package works without triton; only the CUDA fast path needs it
    HAVE_TRITON = False


def target_family() -> str:
    if interpreting() or not torch.cuda.is_available():
        return "interpreter"
    return "hopper" if torch.cuda.get_device_capability()[0] >= 9 else "ampere"


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """What a tensor descriptor needs of each 2-D operand: contiguous rows, a 16-byte aligned base and a row
    stride that is a multiple of 16 bytes."""
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


# (BM, BN, BK, warps, stages, persistent, flatten, warp_specialize). Persistent programs loop over tiles with
# a stride of the SM count; `flatten` fuses the tile and K loops into one pipelined loop. Which wins moves with
# the shape and the Triton version (triton #9279: non-flattened won on an H200), so both are autotuned, with
# one-tile-a-program launches beside them. Warp specialisation is not in the list: compiled for sm_90a (triton
# 3.6 and 3.9) at 4 warps its MMA loop waits for zero outstanding wgmma groups every iteration, and at 8 warps
# the compiler emits the same main loop and shared memory as without it (bench/kernel_build.py's WS_PROBES
# read both off the PTX); the flag stays for Blackwell. Shared memory prunes the list (`fits`). On Ampere the
# descriptors lower to plain loads; those configs compile without spills.
CONFIGS = {
    "hopper": [(128, 256, 64, 8, 3, True, False, False), (128, 256, 64, 8, 3, True, True, False),
               (128, 256, 64, 8, 3, False, False, False), (128, 128, 64, 8, 4, True, False, False),
               (128, 128, 64, 8, 4, True, True, False), (128, 128, 64, 8, 4, False, False, False)],
    "ampere": [(128, 128, 64, 8, 3, False, False, False), (64, 128, 32, 4, 4, False, False, False)],
    "interpreter": [(32, 32, 32, 4, 1, True, False, False)],
}
KEYS = ("BM", "BN", "BK")


def shared_bytes(BM: int, BN: int, BK: int, stages: int, rp: int, esize: int, flatten: bool = False) -> int:
    """Shared memory one program needs: each pipeline stage holds an A and a B tile, the output tile TMA
    stores from is held once, and the rank-r tiles (P in float32, Q) reuse the pipeline's buffers after the
    loop — or, in a flattened loop, where the next tile's loads are already in flight, need their own. Plus
    the barriers. An upper bound on what Triton allocates (tests/test_gpu_build.py checks it against the
    compiler's figure at every config)."""
    pipeline = stages * (BM + BN) * BK * esize
    lowrank = (BM * 4 + BN * esize) * rp
    return max(pipeline, lowrank) + BM * BN * esize + (lowrank if flatten else 0) + 1024


def shared_limit() -> int | None:
    """The device's shared memory per block (opt-in maximum); None under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 232448 if props.major >= 9 else 166912)


def num_sms() -> int:
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def fits(configs, named_args, **kwargs):
    """Drop configs whose tiles do not fit the device's shared memory at these operands' width (fp32
    doubles bf16's). If none fits, the smallest with fewer stages."""
    rp = named_args.get("RP", kwargs.get("RP"))
    esize = named_args["a_ptr"].element_size()
    limit = shared_limit()
    need = lambda c, s=None: shared_bytes(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"],  # noqa: E731
                                          s or c.num_stages, rp, esize, c.kwargs["FLATTEN"])
    kept = [c for c in configs if limit is None or need(c) <= limit]
    if kept:
        return kept
    c = min(configs, key=need)
    stages = c.num_stages
    while stages > 1 and need(c, stages) > limit:
        stages -= 1
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages)]


def make_configs(rows):
    return [triton.Config(dict(zip(KEYS, c[:3]), GROUP_M=8, PERSISTENT=c[5], FLATTEN=c[6], WARP_SPEC=c[7]),
                          num_warps=c[3], num_stages=c[4]) for c in rows]


def set_allocator():
    """Descriptors made inside a kernel need a little global scratch, which Triton asks its allocator for.
    Set per launch: the allocator is a context variable, and a request may run on a thread of its own."""
    if not interpreting():
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))


if HAVE_TRITON:

    @triton.jit
    def tile_ids(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped ordering: GROUP_M row tiles sweep the columns together so their operands stay in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size
        pid_n = (tile % per_group) // size
        return pid_m, pid_n

    @triton.jit
    def gemm_kernel(a_ptr, b_ptr, p_ptr, q_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET, NUM_SMS,
                    TRANS_B: tl.constexpr, TRANS_Q: tl.constexpr, HAS_LOWRANK: tl.constexpr,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, RP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr):
        # PERSISTENT: min(SMs, tiles) programs striding over the tiles; else one program a tile (the launcher's
        # grid is the same formula)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        if TRANS_B:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        if HAS_LOWRANK:
            p_desc = tl.make_tensor_descriptor(p_ptr, shape=[M, RP], strides=[RP, 1], block_shape=[BM, RP])
            if TRANS_Q:
                q_desc = tl.make_tensor_descriptor(q_ptr, shape=[N, RP], strides=[RP, 1], block_shape=[BN, RP])
            else:
                q_desc = tl.make_tensor_descriptor(q_ptr, shape=[RP, N], strides=[N, 1], block_shape=[RP, BN])
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        num_tiles = num_m * num_n
        if PERSISTENT:
            programs = tl.minimum(NUM_SMS, num_tiles)
        else:
            programs = num_tiles
        for tile in tl.range(tl.program_id(0), num_tiles, programs, flatten=FLATTEN, warp_specialize=WARP_SPEC):
            pid_m, pid_n = tile_ids(tile, num_m, num_n, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):  # one dot, no branch: pipelined, wgmma kept in flight
                a = a_desc.load([om, ki * BK])
                if TRANS_B:
                    b = b_desc.load([on, ki * BK]).T
                else:
                    b = b_desc.load([ki * BK, on])
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            if HAS_LOWRANK:  # the rank-r term, once per tile
                if TRANS_Q:
                    q = q_desc.load([on, 0]).T
                else:
                    q = q_desc.load([0, on])
                p = p_desc.load([om, 0])
                if UPCAST:
                    acc = tl.dot(p, q.to(tl.float32), acc)
                else:
                    acc = tl.dot(p.to(q.dtype), q, acc)
            if HAS_BIAS:
                cols = on + tl.arange(0, BN)
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            c_desc.store([om, on], acc.to(c_ptr.dtype.element_ty))

    @functools.lru_cache(maxsize=None)
    def tuned(family: str):
        """gemm_kernel in triton.autotune over the family's configs (one under the interpreter), keyed on the
        row-count bucket, the shapes, the rank and the layout, so a new batch size re-tunes once."""
        return triton.autotune(make_configs(CONFIGS[family]),
                               key=["M_BUCKET", "N", "K", "RP", "TRANS_B", "TRANS_Q", "HAS_LOWRANK"],
                               prune_configs_by={"early_config_prune": fits})(gemm_kernel)


def bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 16))


def gemm(a, b, p=None, q=None, bias=None, trans_b: bool = True, trans_q: bool = True, out=None):
    """C = a·op(b) (+ p·op(q)) (+ bias) on 2-D contiguous, TMA-compatible operands. op(b) is bᵀ when trans_b
    (b stored [N,K]), else b ([K,N]); likewise q ([N,r] or [r,N]). p is float32 [M,r] with r padded to a power
    of two ≥ 16 (q padded alike). out may be passed in (tests poison it)."""
    M, K = a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype) if out is None else out
    rp = p.shape[1] if p is not None else 16
    set_allocator()
    sms = num_sms()
    tiles = lambda meta: triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])  # noqa: E731
    grid = lambda meta: (min(tiles(meta), sms) if meta["PERSISTENT"] else tiles(meta),)  # noqa: E731
    tuned(target_family())[grid](
        a, b, p if p is not None else a, q if q is not None else b, bias if bias is not None else c, c,
        M, N, K, bucket(M), sms, TRANS_B=trans_b, TRANS_Q=trans_q, HAS_LOWRANK=p is not None,
        HAS_BIAS=bias is not None, UPCAST=interpreting(), RP=rp)
    return c


def gemm_reference(a, b, p=None, q=None, bias=None, trans_b: bool = True, trans_q: bool = True):
    """Plain torch, in a's dtype (float64 in the tests)."""
    c = a @ (b.t() if trans_b else b)
    if p is not None:
        c = c + p.to(a.dtype) @ (q.t() if trans_q else q).to(a.dtype)
    return c + bias.to(a.dtype) if bias is not None else c
