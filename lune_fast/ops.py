"""The compiled ops (lune_fast._C): loading, fake (meta) and autograd registration, device dispatch.

`linear_logprob(h, W, y)` = log softmax(h Wᵀ)[y] per row, for a frozen head W, without materialising the
N×V logits. The C++ op forms the gradient direction in the same pass (see csrc/linear_logprob.h), so the
backward is an elementwise product. Targets equal to IGNORE_INDEX give 0 and no gradient.

`rms_norm(x, w, eps, offset)`: the model's RMSNorm in one CPU op, for forwards that take no gradient.

`decode_attention(...)`: one decoding step's attention (rope, KV-cache write, one query against the cache) in one
CPU op; `decode_layer(...)` a Llama-family layer's whole decoding step from the CPU kernels (Block.decode_step).
`few_rows_linear(x, w, b)` (through kernels/frozen_linear.py) is the bf16 product at a few rows.
"""
from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_MB = float(os.environ.get("LUNE_FAST_CHUNK_MB", "64"))
_state: dict = {}


def extension():
    """lune_fast._C, or None when it was not built (the torch reference path is used then)."""
    if "C" not in _state:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.lune_fast.*)

            _state["C"] = _C
            _register_python_side()
        except ImportError as e:
            _state["C"] = None
            _state["error"] = str(e)
    return _state["C"]


def extension_error() -> str | None:
    extension()
    return _state.get("error")


def _register_python_side() -> None:
    @torch.library.register_fake("lune_fast::linear_logprob")
    def _fake(h, w, y, chunk_rows, chunk_vocab, with_grad):
        grad = h.new_empty(h.shape) if with_grad else h.new_empty(0)
        return h.new_empty(h.shape[0], dtype=torch.float64 if h.dtype == torch.float64 else torch.float32), grad

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _backward(ctx, g_logp, _g_grad):
        (grad_dir,) = ctx.saved_tensors
        if grad_dir.numel() == 0 and g_logp.numel() != 0:
            raise RuntimeError("linear_logprob was called without with_grad; its input needs a gradient")
        dh = (g_logp[:, None] * grad_dir).neg_().to(grad_dir.dtype)
        return dh, None, None, None, None, None

    torch.library.register_autograd("lune_fast::linear_logprob", _backward, setup_context=_setup)

    @torch.library.register_fake("lune_fast::decode_attention")
    def _fake_decode(q, k, v, cos, sin, cache_k, cache_v, start, allowed, window, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lune_fast::decode_layer")
    def _fake_layer(x, *rest):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lune_fast::few_rows_linear")
    def _fake_few_rows(x, w, b):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("lune_fast::rms_norm")
    def _fake_norm(x, w, eps, offset):
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor | None:
    """RMSNorm of x's rows in one C++ op (the model's arithmetic: csrc/cpu/rms_norm.cpp) where it applies — a
    CPU tensor of bf16 or float32 that needs no gradient, the extension built — else None (the caller's torch
    path runs)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or w.dtype != x.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) or extension() is None):
        return None
    return torch.ops.lune_fast.rms_norm(x, w, eps, offset)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, allowed: torch.Tensor | None,
                     window: int, scale: float) -> torch.Tensor | None:
    """One query a row [B, H, D] (k, v [B, KVH, D], before the rope; cos/sin [B, D]): rope, k and v written into the
    caches [B, KVH, max_len, D] at `start`, attention over positions [0, start] (those `allowed` [B, start + 1]
    lets through, the last `window` of them where > 0) with `scale`; [B, H, D] (csrc/cpu/decode_attention.cpp).
    None where it does not apply — not CPU bf16/float32, a gradient needed, the extension missing — and nothing
    is written then (the caller's torch path runs)."""
    if (q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32) or extension() is None
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    return torch.ops.lune_fast.decode_attention(q, k, v, cos, sin, cache_k, cache_v, start, allowed, window, scale)


def decode_layer(*args) -> torch.Tensor:
    """One decoding step through a Llama-family layer (csrc/cpu/decode_layer.cpp; Block.decode_step says when it
    applies and passes the arguments): the modules' kernels, called from C++."""
    return torch.ops.lune_fast.decode_layer(*args)


def chunk_sizes(n: int, v: int, elem_bytes: int, budget_mb: float = DEFAULT_CHUNK_MB) -> tuple[int, int]:
    """Rows and vocabulary columns per chunk so that one chunk of logits fits the budget. Whole rows when
    at least 64 of them fit (one pass); else 256 rows and vocabulary chunks (two passes)."""
    budget = max(1, int(budget_mb * 2**20))
    rows = budget // (v * elem_bytes)
    if rows >= min(n, 64):
        return max(1, min(n, rows)), v
    rows = min(n, 256)
    return rows, max(128, budget // (rows * elem_bytes))


def linear_logprob(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk_mb: float = DEFAULT_CHUNK_MB,
                   use_extension: bool = True) -> torch.Tensor:
    """Per-row target log-probability [N] (float32; float64 for float64 inputs) of a frozen linear head."""
    if w.requires_grad:
        raise ValueError("linear_logprob: the head W must be frozen (requires_grad=False)")
    if not (use_extension and extension() is not None):
        return linear_logprob_reference(h, w, y)
    cr, cv = chunk_sizes(h.shape[0], w.shape[0], h.element_size(), chunk_mb)
    with_grad = torch.is_grad_enabled() and h.requires_grad
    logp, _ = torch.ops.lune_fast.linear_logprob(h, w, y, cr, cv, with_grad)
    return logp


def linear_logprob_reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain torch: full logits, log_softmax in float32, gather. The oracle of the fused op."""
    logits = h @ w.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lp = torch.log_softmax(logits, dim=-1).gather(1, y.clamp_min(0)[:, None])[:, 0]
    return torch.where(y == IGNORE_INDEX, torch.zeros_like(lp), lp)
