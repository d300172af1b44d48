"""Cheap parts of the frozen model recomputed in the backward instead of kept: what autograd keeps of a training
step is most of its memory.

Training backpropagates through every layer above the first adapted one (the defaults on 32 facts: ~460 MB of
activations, `lune-fast bench e2e`'s peak). Three of the largest items cost little to compute again:
- RMSNorm's graph keeps float32 copies of its input (twice the bf16 row);
- the gated activation act(gate) * up keeps act(gate) beside gate and up;
- the explicit attention keeps its probabilities in float32 and again in bf16 ([heads, T, T] a row).
`recomputed(fn, *inputs)` keeps only the inputs and, in the backward, runs `fn` again with a gradient and takes
its backward: the same graph torch would have built, so the gradients are its own, bit for bit. The matmuls
that dominate a step's time (the projections) are never recomputed.
"""
from __future__ import annotations

from typing import Callable

import torch


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)  # grad mode is off inside a Function's forward

    @staticmethod
    def backward(ctx, dy):
        wants = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(w) for t, w in zip(ctx.saved_tensors, wants)]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, [t for t, w in zip(inputs, wants) if w], dy))
        return (None, *[next(grads) if w else None for w in wants])


def recomputed(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs) (one tensor out); where a gradient flows, only the inputs are kept and fn runs again in the
    backward. fn's other operands (frozen weights, constants) must need no gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Recomputed.apply(fn, *inputs)
    return fn(*inputs)
