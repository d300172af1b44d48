"""lune_fast.recompute: the RMSNorm, the gated activation and the explicit attention keep only their inputs for
the backward and run again there. The gradients must be torch's own graph's, bit for bit, through whole layers of
real model families (Llama and Gemma 3: its norm offset, gelu and sliding windows), packed rows and padded ones;
and a training step must keep less."""
import pytest
import torch

import lune_fast.model as M
from conftest import make_tiny_hf
from lune_fast.data import make_batch
from lune_fast.recompute import recomputed
from lune_fast.weights import load_model

pytestmark = pytest.mark.numerics


def _plain(monkeypatch):
    monkeypatch.setattr(M, "recomputed", lambda fn, *inputs: fn(*inputs))


def _backward(model, h, positions, mask):
    """d(sum of the top layer's output · a fixed random direction) / d(the input hidden states), and the bytes
    autograd kept for it."""
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    x = h.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.run_layers(x, positions, mask)
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, direction)
    weights = {(p.untyped_storage().data_ptr(), p.dtype) for p in model.parameters()}
    return grad, sum(n for k, n in kept.items() if k not in weights)


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_recomputed_layers_give_torchs_own_gradients_and_keep_less(kind, layout, tmp_path, monkeypatch):
    make_tiny_hf(kind, tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16, pack=False)
    torch.manual_seed(0)
    # sequences of 5-19 tokens: right-padded one a row, or packed several a row as training lays them out
    pairs = [(list(range(1, n)), [7]) for n in (6, 11, 15, 9, 20)]
    batch = make_batch(pairs, pack=24 if layout == "packed" else None)
    positions, mask = batch.layout()
    h = torch.randn(*batch.input_ids.shape, model.config.hidden_size).to(torch.bfloat16)
    grad, kept = _backward(model, h, positions, mask)
    _plain(monkeypatch)
    grad_plain, kept_plain = _backward(model, h, positions, mask)
    assert torch.isfinite(grad_plain).all() and grad_plain.abs().max() > 0
    assert torch.equal(grad, grad_plain)
    # each layer keeps its two norms' float32 copies, act(gate) and the probabilities no more
    assert kept < 0.75 * kept_plain, (kept, kept_plain)


def test_recomputed_passes_gradients_only_where_asked():
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, dtype=torch.float64)  # no gradient asked
    fn = lambda a, b: torch.tanh(a) * b.exp()  # noqa: E731
    out = recomputed(fn, a, b)
    assert out.grad_fn is not None and torch.equal(out, fn(a, b))
    (g,) = torch.autograd.grad(out.sum(), a)
    assert torch.allclose(g, (1 - torch.tanh(a) ** 2) * b.exp(), rtol=1e-12, atol=0)
    with torch.no_grad():  # no gradient: fn itself, nothing kept
        assert recomputed(fn, a, b).grad_fn is None
