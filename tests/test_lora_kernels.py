"""The Triton fused LoRA kernels against a float64 reference (on CPU under TRITON_INTERPRET=1).

Bounds: float32 operands 1e-5 relative under the interpreter (true fp32 products). On a GPU a float32
tl.dot uses TF32 (10-bit mantissa) unless told otherwise: ~1e-3 relative; bf16 operands (8-bit mantissa,
fp32 accumulation) land between 1e-3 and 1e-2, so the device tests use 2e-2 for bf16 and 5e-3 for fp32.
"""
import pytest
import torch

from conftest import rel_err

K = pytest.importorskip("lune_fast.kernels.lora_linear")
pytestmark = pytest.mark.skipif(not K.available(), reason="triton unavailable (no GPU and no interpreter)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if DEV == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

SHAPES = [(37, 70, 45), (50, 64, 33), (129, 40, 100)]  # N, in, out: none a multiple of the 32-wide blocks


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


@pytest.mark.parametrize("r", [4, 8, 16, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_float32_poisoned_outputs(shape, r):
    N, din, dout = shape
    s = 2.0
    x, w, b, A, B = _operands(N, din, dout, r, torch.float32, seed=r)
    dy = torch.randn(N, dout, device=DEV)
    y_ref, dx_ref, dA_ref, dB_ref = _ref64(x, w, b, A, B, s, dy)
    y = torch.full((N, dout), float("nan"), device=DEV)
    xa = torch.full((N, r), float("nan"), device=DEV)
    K.forward(x, w, A, B * s, b, y=y, xa=xa)
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    assert rel_err(xa, x.double() @ A.double().t()) <= TOL[torch.float32]
    dx = torch.full((N, din), float("nan"), device=DEV)
    dx, dA, G = K.backward(dy, x, xa, w, A, B * s, dx=dx)
    assert rel_err(dx, dx_ref) <= TOL[torch.float32]
    assert rel_err(dA, dA_ref) <= TOL[torch.float32]
    assert rel_err(G * s, dB_ref) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_autograd_function(dtype):
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


def test_grouped_qkv_one_kernel():
    """q/k/v share x: one launch over the stacked weights equals three separate adapted projections."""
    din, outs, ranks, scales = 64, (64, 32, 32), (8, 8, 16), (2.0, 2.0, 1.0)
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


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_configs_that_overflow_shared_memory_are_pruned(kind, monkeypatch):
    """fp32 operands double the tiles: at rank 64 every Hopper forward config needs more than the H200's
    227 KB per block (one failed to launch there), so the smallest is kept with fewer stages; bf16 keeps all."""
    limit = 232448
    monkeypatch.setattr(K, "shared_limit", lambda: limit)
    names = ("BM", "BN", "BK") if kind == "fwd" else ("BM", "BK", "BN")
    configs = K._configs("hopper", kind, names)
    arg = "x_ptr" if kind == "fwd" else "dy_ptr"

    def need(c, esize):
        return K.shared_bytes(kind, c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages, 64, esize)

    kept32 = K._fits(configs, {arg: torch.empty(1), "RP": 64})
    kept16 = K._fits(configs, {arg: torch.empty(1, dtype=torch.bfloat16), "RP": 64})
    assert kept32 and all(need(c, 4) <= limit for c in kept32)
    assert any(need(c, 4) > limit for c in configs)
    assert len(kept16) == len(configs) and all(need(c, 2) <= limit for c in kept16)


@pytest.mark.skipif(DEV == "cuda", reason="drives the autotuner with the interpreter's configs; what it guards "
                                           "(reset_to_zero on the partials) does not depend on the device")
def test_autotuning_leaves_no_stale_partials(monkeypatch):
    """Autotuning runs every backward config on the same dA/dB partial slabs; when the winner has a larger BM
    (fewer slabs) than one tried before it, the slabs only the loser wrote must not reach the sum. Two
    interpreter configs (BM 16 and 32, M = 40: three slabs against two), the larger made to win."""
    monkeypatch.setitem(K.CONFIGS, ("interpreter", "bwd"), [(16, 32, 32, 4, 1, 64), (32, 32, 32, 4, 1, 64)])
    monkeypatch.setattr(K, "interpreting", lambda: True)
    K._tuned.cache_clear()
    try:
        kern = K._tuned("bwd", "interpreter")
        run_once = kern._bench
        kern._do_bench = lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]
        kern._bench = lambda *args, config, **meta: (run_once(*args, config=config, **meta),
                                                     [1.0 / config.kwargs["BM"]] * 3)[1]
        x, w, b, A, B = _operands(40, 48, 36, 8, torch.float32, seed=11)
        dy = torch.randn(40, 36, device=DEV)
        _, dx_ref, dA_ref, dB_ref = _ref64(x, w, b, A, B, 2.0, dy)
        _, xa = K.forward(x, w, A, B * 2.0, b)
        dx, dA, G = K.backward(dy, x, xa, w, A, B * 2.0)
        assert kern.cache and all(c.kwargs["BM"] == 32 for c in kern.cache.values())
        assert rel_err(dA, dA_ref) <= TOL[torch.float32] and rel_err(G * 2.0, dB_ref) <= TOL[torch.float32]
    finally:
        K._tuned.cache_clear()


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
