"""The Triton fused LoRA kernels against a float64 reference (on CPU under TRITON_INTERPRET=1).

Bounds: float32 operands 1e-5 relative under the interpreter (true fp32 products). On a GPU a float32
tl.dot uses TF32 (10-bit mantissa) unless told otherwise: ~1e-3 relative; bf16 operands (8-bit mantissa,
fp32 accumulation) land between 1e-3 and 1e-2, so the device tests use 2e-2 for bf16 and 5e-3 for fp32.
The interpreter computes bf16 correctly only because the kernels upcast there (triton #11584), so bf16 runs
under it too, with bf16's bound.
"""
import pytest
import torch

from conftest import rel_err

K = pytest.importorskip("lune_fast.kernels.lora_linear")
pytestmark = pytest.mark.skipif(not K.available(), reason="triton unavailable (no GPU and no interpreter)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if DEV == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# N, in, out: none a multiple of the 32-wide interpreter blocks; every feature count a multiple of 8, as TMA
# needs of 2-byte rows (a shape that is not runs the torch chain: test_unaligned_features_run_the_chain)
SHAPES = [(37, 72, 40), (50, 64, 104), (129, 40, 96)]


def _operands(N, din, dout, r, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEV)  # noqa: E731
    x, w = mk(N, din).to(dtype), mk(dout, din, scale=din ** -0.5).to(dtype)
    A, B = mk(r, din, scale=0.5), mk(dout, r, scale=0.5)
    b = mk(dout).to(dtype) if bias else None
    return x, w, b, A, B


def _ref64(x, w, b, A, B, s, dy):
    xd = x.double().requires_grad_()
    Ad, Bd = A.double().requires_grad_(), B.double().requires_grad_()
    y = K.lora_linear_reference(xd, w.double(), None if b is None else b.double(), Ad, Bd, s)
    y.backward(dy.double())
    return y.detach(), xd.grad, Ad.grad, Bd.grad


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


@pytest.mark.parametrize("r", [4, 8, 16, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_float32_poisoned_outputs(shape, r):
    """Each launch on its own: S, y, dS with G, dx, dA — every output NaN-poisoned first."""
    N, din, dout = shape
    s = 2.0
    x, w, b, A, B = _operands(N, din, dout, r, torch.float32, seed=r)
    dy = torch.randn(N, dout, device=DEV)
    y_ref, dx_ref, dA_ref, dB_ref = _ref64(x, w, b, A, B, s, dy)
    a, b_s = K.pad_rank(A, B * s, torch.float32)
    rp = K.rank_pad(r)
    assert a.shape == (rp, din) and b_s.shape == (dout, rp)
    y, S = K.forward(x, w, a, b_s, b, y=_nan(N, dout), s=_nan(N, rp))
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    assert rel_err(S[:, :r], x.double() @ A.double().t()) <= TOL[torch.float32] and not S[:, r:].any()
    for deterministic in (False, True):
        ds, G = K.dy_pass(dy, b_s, S, deterministic=deterministic, ds=_nan(N, rp))
        assert rel_err(ds[:, :r], dy.double() @ B.double() * s) <= TOL[torch.float32]
        assert rel_err(G[:, :r] * s, dB_ref) <= TOL[torch.float32] and not G[:, r:].any()
    dx = K.gemm(dy, w, ds, a, trans_b=False, trans_q=False, out=_nan(N, din))
    assert rel_err(dx, dx_ref) <= TOL[torch.float32]
    dA = K.ds_x(ds, x)
    assert rel_err(dA[:r], dA_ref) <= TOL[torch.float32] and not dA[r:].any()


def test_deterministic_mode_repeats_bit_for_bit():
    """With partial sums instead of atomics, G is the same bits on every run (and equals the atomic sum)."""
    x, w, b, A, B = _operands(129, 40, 96, 8, torch.float32, seed=3)
    dy = torch.randn(129, 96, device=DEV)
    a, b_s = K.pad_rank(A, B, torch.float32)
    _, S = K.forward(x, w, a, b_s)
    g1 = K.dy_pass(dy, b_s, S, deterministic=True)[1]
    g2 = K.dy_pass(dy, b_s, S, deterministic=True)[1]
    assert torch.equal(g1, g2)
    assert rel_err(K.dy_pass(dy, b_s, S, deterministic=False)[1], g1.double()) <= 1e-6


def _no_chain(monkeypatch):
    """Make the torch chain unusable, so a test proves the Triton Function ran."""
    def refuse(*args):
        raise AssertionError("the torch chain ran where the Triton kernels should have")
    monkeypatch.setattr(K.LoRALinearTorch, "apply", refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_autograd_function(dtype, monkeypatch):
    _no_chain(monkeypatch)
    x, w, b, A, B = _operands(45, 96, 72, 8, dtype, seed=7)
    dy = torch.randn(3, 15, 72, device=DEV).to(dtype)
    xx = x.view(3, 15, 96).clone().requires_grad_()
    AA, BB = A.clone().requires_grad_(), B.clone().requires_grad_()
    y = K.lora_linear(xx, w, b, AA, BB, 1.5, backend="triton")
    assert y.shape == (3, 15, 72) and y.dtype == dtype
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref = _ref64(x, w, b, A, B, 1.5, dy.view(45, 72))
    tol = TOL[dtype]
    assert rel_err(y.view(45, 72), y_ref) <= tol
    assert rel_err(xx.grad.view(45, 96), dx_ref) <= tol
    assert AA.grad.dtype == torch.float32 and rel_err(AA.grad, dA_ref) <= tol
    assert BB.grad.dtype == torch.float32 and rel_err(BB.grad, dB_ref) <= tol


def test_unaligned_features_run_the_chain():
    """45 input features make 90-byte bf16 rows, which TMA cannot address: the op runs the torch chain
    (and still equals the reference) instead of failing."""
    x, w, b, A, B = _operands(20, 45, 24, 4, torch.bfloat16, seed=2)
    assert not K.tma_ready(x, w) and K.tma_ready(x[:, :40].contiguous(), w[:, :40].contiguous())
    y = K.lora_linear(x, w, b, A, B, 1.0, backend="triton")
    ref = K.lora_linear_reference(x.double(), w.double(), b.double(), A.double(), B.double(), 1.0)
    assert rel_err(y, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("group", [("qkv", 64, (64, 32, 32), (8, 8, 16), (2.0, 2.0, 1.0)),
                                   ("gate_up", 48, (96, 96), (16, 16), (2.0, 2.0))], ids=lambda g: g[0])
def test_grouped_projections_one_op(group, monkeypatch):
    """q/k/v (or gate/up) share x: one op over the stacked weights (one shrink pass over x for every adapter)
    equals the separately adapted projections."""
    _no_chain(monkeypatch)
    _, din, outs, ranks, scales = group
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, din, generator=g).to(DEV)
    ws = [(torch.randn(o, din, generator=g) * din ** -0.5).to(DEV) for o in outs]
    bs = [torch.randn(o, generator=g).to(DEV) for o in outs]
    As = [(torch.randn(r, din, generator=g) * 0.5).to(DEV).requires_grad_() for r in ranks]
    Bs = [(torch.randn(o, r, generator=g) * 0.5).to(DEV).requires_grad_() for o, r in zip(outs, ranks)]
    xx = x.clone().requires_grad_()
    ys = K.grouped_lora_linear(xx, torch.cat(ws), torch.cat(bs), As, Bs, scales, outs, backend="triton")
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    xd = x.double().requires_grad_()
    Ad = [a.detach().double().requires_grad_() for a in As]
    Bd = [b.detach().double().requires_grad_() for b in Bs]
    refs = [K.lora_linear_reference(xd, w.double(), b.double(), a, bb, s)
            for w, b, a, bb, s in zip(ws, bs, Ad, Bd, scales)]
    torch.autograd.backward(refs, [d.double() for d in dys])
    for y, ref in zip(ys, refs):
        assert rel_err(y, ref) <= TOL[torch.float32]
    assert rel_err(xx.grad, xd.grad) <= TOL[torch.float32]
    for a, ad in zip(As, Ad):
        assert rel_err(a.grad, ad.grad) <= TOL[torch.float32]
    for b, bd in zip(Bs, Bd):
        assert rel_err(b.grad, bd.grad) <= TOL[torch.float32]


def test_rank_pad():
    assert [K.rank_pad(r) for r in (1, 4, 8, 16, 17, 64)] == [16, 16, 16, 16, 32, 64]


def test_grouped_attach_matches_separate_projections(tmp_path):
    """lora.attach(grouped=True) runs q/k/v and gate/up as one kernel each; logits and adapter gradients
    equal the ungrouped model's."""
    from conftest import make_tiny_hf
    from lune_fast import lora
    from lune_fast.weights import load_model

    make_tiny_hf("qwen2", tmp_path)  # q/k/v biases too
    settings = lora.LoraSettings(rank=4, alpha=8, targets=("q", "k", "v", "gate", "up", "down"), layers=(1, 2))
    ids = torch.randint(0, 211, (2, 9))
    grads, outs = [], []
    for grouped in (False, True):
        m = load_model(tmp_path).to(DEV)
        ad = lora.attach(m, settings, seed=0, grouped=grouped)
        with torch.no_grad():
            for a in ad.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        out = m(ids.to(DEV))
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({k: (a.lora_A.grad.clone(), a.lora_B.grad.clone()) for k, a in ad.items()})
        if grouped:
            assert "project_qkv" in m.layers[1].self_attn.__dict__
            lora.detach(m)
            assert "project_qkv" not in m.layers[1].self_attn.__dict__
    assert rel_err(outs[1], outs[0]) <= TOL[torch.float32]
    for k in grads[0]:
        for g1, g0 in zip(grads[1][k], grads[0][k]):
            assert rel_err(g1, g0) <= 1e-4, k
