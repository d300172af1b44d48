"""The frozen projections' product y = x Wᵀ (+ b): on a CPU, from oneDNN's prepacked copy of W.

torch's bf16 `F.linear` on a CPU hands W to oneDNN in its plain [out, in] layout, and oneDNN reorders it into
its blocked layout on every call. For the short inputs unlearning runs — one token a step when decoding, a few
dozen when training one fact — that reorder is a good part of the time (a 1536×576 weight read from memory:
171 µs a call at 1 row, 125 µs prepacked; 229 vs 162 µs at 64 rows; Intel Xeon AMX, 2 cores, `lune-fast bench
frozen-linear`, RESULTS.md section 13). Here each
frozen weight is reordered once, kept beside the weight (the weight itself stays as it is: merges, exports and
keyed adapters read it), and packed again whenever the weight changed in place (its version counter moved) or
was replaced (another storage). float32 (the default where a CPU has no AVX-512) goes through MKL's sgemm, whose
small-row products are slow for other reasons; the packed copy is used where it measured faster (FLOAT32_ROWS:
the check's decoding of a request's prompts, 1.5x in all at 8 rows; the head at any rows).

At one to FEW_ROWS rows in bf16 with no gradient (a decoding step: a request's check decodes one row a fact)
the product is lune_fast._C's few_rows_linear instead, on a CPU with AVX512-BF16: a dot product per output
that streams W in its own row-major layout. With every weight coming from memory it reads 18-28 GB/s at one row
where oneDNN's packed product reads 10-24 (1.35-1.8x a projection, the head 1.2x; at 4 rows 1.05-1.6x, the head
0.93x; at 8 rows no faster: `lune-fast bench frozen-linear`, RESULTS.md section 13); this VM streams ~23 GB/s.

`frozen_linear(x, w, b, pack=True)` is the one dispatch point; `reference` is plain torch. The backward of
the packed product (training reads the gradient of x through every frozen layer) is the one F.linear's
autograd computes, dy·W, so only the forward differs. Where oneDNN cannot pack (bf16 without AVX512-BW/VL/DQ or
AVX-NE-CONVERT: e.g. ONEDNN_MAX_CPU_ISA=AVX2), other dtypes, other devices, and weights that train, it is
F.linear.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# oneDNN picks its blocked layout for an expected number of rows; one layout serves every row count (the
# product it gives is F.linear's, bit for bit, at 1-1024 rows on an AMX Xeon; tests bound it against float64)
ROWS_HINT = 128


PACKED_DTYPES = (torch.bfloat16, torch.float32)
# float32 (AMD EPYC without AVX-512, 2 cores, `lune-fast bench frozen-linear --dtype float32`, RESULTS.md section
# 13): a packed weight is read faster at the few rows decoding runs (1.1-1.8x at 8 rows for 576×576 and up,
# 3x the head), not for a small one (k/v, 192×576: 80 against 101 µs at 8 rows), and at 64 rows and more
# F.linear is as fast or faster (0.7-1.4x) except for a weight as large as the head (1.2-2.2x at any rows)
FLOAT32_ROWS, FLOAT32_MIN, FLOAT32_LARGE = 32, 1 << 18, 1 << 22
# bf16 rows up to which the few-rows dot product runs (at 8 rows it gains on some shapes only, and loses on the head)
FEW_ROWS = 4


@functools.cache
def packing_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Can oneDNN prepack a weight of `dtype` on this CPU (as this process's ISA limits allow)?"""
    if dtype not in PACKED_DTYPES:
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), ROWS_HINT)
        return bool((_packed_product(torch.ones(2, 16, dtype=dtype), packed, None) == 16).all())
    except (RuntimeError, AttributeError):
        return False


def _packable(x: torch.Tensor, w: torch.Tensor) -> bool:
    # x is on W's device (F.linear would refuse otherwise); the cheapest tests first: this runs on every call
    return (x.dtype is w.dtype and not w.requires_grad and w.dim() == 2 and w.device.type == "cpu"
            and type(w.data) is torch.Tensor and packing_supported(w.dtype)
            and (w.dtype is torch.bfloat16 or w.numel() >= FLOAT32_LARGE
                 or (w.numel() >= FLOAT32_MIN and x.numel() <= FLOAT32_ROWS * x.shape[-1])))


def few_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Does x Wᵀ take the few-rows product (the model's decoding step asks, for its one-op layer)?"""
    return (x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16 and w.device.type == "cpu"
            and x.numel() <= FEW_ROWS * x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)
            and not w.requires_grad and w.dim() == 2 and few_rows_supported())


@functools.cache
def few_rows_supported() -> bool:
    """Is lune_fast._C built, on a CPU with AVX512-BF16 dot products?"""
    from ..ops import extension

    C = extension()
    return C is not None and C.bf16_dot_supported()


def packed_weight(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of `w`, made once and kept on the tensor until `w` changes."""
    key = (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()))
    kept = getattr(w, "_lune_packed", None)
    if kept is None or kept[0] != key:
        kept = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), ROWS_HINT))
        w._lune_packed = kept
    return kept[1]


def _packed_product(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, packed, b):
        ctx.save_for_backward(w)
        return _packed_product(x, packed, b)

    @staticmethod
    def backward(ctx, dy):
        (w,) = ctx.saved_tensors
        return dy @ w, None, None, None


def frozen_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, pack: bool = True
                  ) -> torch.Tensor:
    """x Wᵀ (+ b) for a frozen W; with `pack`, from W's prepacked copy where that is supported."""
    if not pack or (b is not None and b.requires_grad):
        return F.linear(x, w, b)
    if few_rows(x, w):
        return torch.ops.lune_fast.few_rows_linear(x, w, b)
    if not _packable(x, w):
        return F.linear(x, w, b)
    packed = packed_weight(w)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PackedLinear.apply(x, w, packed, b)
    return _packed_product(x, packed, b)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: the oracle."""
    return F.linear(x, w, b)
