"""The fused head log-prob op (C++ CPU twin of the CUDA op) against a float64 reference."""
import pytest
import torch

from conftest import rel_err
from lune_fast import ops

pytestmark = pytest.mark.numerics  # run again under other instruction sets (Makefile)

pytestmark = pytest.mark.skipif(ops.extension() is None, reason=f"lune_fast._C not built: {ops.extension_error()}")
# the same tests on every device present (CUDA where the extension was built with it)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and getattr(ops.extension(), "with_cuda", False) else [])


def reference64(h, w, y):
    """float64 log p(y) and d(sum g*logp)/dh from the same (rounded) inputs."""
    hd = h.detach().double().requires_grad_()
    lp = torch.log_softmax(hd @ w.double().t(), -1).gather(1, y.clamp_min(0)[:, None])[:, 0]
    lp = torch.where(y == -100, torch.zeros_like(lp), lp)
    return lp, hd


def _inputs(N, H, V, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.randperm(N, generator=g)[: max(1, N // 7)]] = -100
    return h.to(device), w.to(device), y.to(device)


# chunk_rows / chunk_vocab: whole rows (one pass), rows not a multiple of the chunk, vocabulary chunks
# not dividing V (two passes), a single row per chunk.
CHUNKS = [(64, 10**9), (13, 10**9), (16, 300), (7, 1000), (1, 129)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cr,cv", CHUNKS)
def test_forward_backward_float32(cr, cv, device):
    # on CUDA the chunk matmuls are cuBLAS: TF32 is off by default for matmuls in torch, so 1e-5 holds there too
    h, w, y = _inputs(45, 64, 1000, torch.float32, device=device)
    ref, hd = reference64(h, w, y)
    g = torch.randn(45, dtype=torch.float64, device=device)
    (ref * g).sum().backward()
    for with_grad in (False, True):
        logp, grad_dir = torch.ops.lune_fast.linear_logprob(h, w, y, cr, cv, with_grad)
        assert logp.dtype == torch.float32
        assert rel_err(logp, ref) <= 1e-5
        assert bool((logp[y == -100] == 0).all())
    dh = -(g[:, None] * grad_dir.double())
    assert rel_err(dh, hd.grad) <= 1e-5
    assert bool((grad_dir[y == -100] == 0).all())


def test_autograd_wrapper_over_vocabulary_chunks():
    h, w, y = _inputs(33, 32, 517, torch.float32, seed=3)
    hh = h.clone().requires_grad_()
    lp = ops.linear_logprob(hh, w, y, chunk_mb=0.01)  # tiny budget: vocabulary chunks
    (lp * torch.arange(33)).sum().backward()
    ref, hd = reference64(h, w, y)
    (ref * torch.arange(33, dtype=torch.float64)).sum().backward()
    assert rel_err(lp, ref) <= 1e-5 and rel_err(hh.grad, hd.grad) <= 1e-5
    assert torch.isfinite(hh.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cr,cv", [(64, 10**9), (9, 200)])
def test_bfloat16_bound(cr, cv, device):
    """bf16 inputs: the chunk logits are bf16 (as eager's h @ Wᵀ is), so each logit carries a rounding of up
    to 2^-9 of its size; log-sum-exp and the gradient are accumulated in float32. The bound: |Δlogp| ≤
    2^-8 · max|logit| + 1e-3, and the gradient within 2e-2 relative (bf16 matmul output)."""
    h, w, y = _inputs(40, 64, 800, torch.bfloat16, seed=1, device=device)
    ref, hd = reference64(h, w, y)
    g = torch.randn(40, dtype=torch.float64, device=device)
    (ref * g).sum().backward()
    logp, grad_dir = torch.ops.lune_fast.linear_logprob(h, w, y, cr, cv, True)
    max_logit = (h.double() @ w.double().t()).abs().max().item()
    assert (logp.double() - ref).abs().max().item() <= 2 ** -8 * max_logit + 1e-3
    assert rel_err(-(g[:, None] * grad_dir.double()), hd.grad) <= 2e-2


@pytest.mark.parametrize("chunk_mb", [64, 0.0005])
def test_gradcheck_float64(chunk_mb):
    """float64 goes through the op's generic (ATen) row passes, one-pass and vocabulary-chunked."""
    h, w, y = _inputs(5, 6, 37, torch.float64, seed=2)
    hh = h.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.linear_logprob(t, w, y, chunk_mb=chunk_mb), (hh,))
    ref, _ = reference64(h, w, y)
    assert rel_err(ops.linear_logprob(h, w, y, chunk_mb=chunk_mb), ref) <= 1e-12


def test_float16_on_cpu_uses_generic_passes():
    h, w, y = _inputs(20, 16, 100, torch.float16, seed=5)
    ref, _ = reference64(h, w, y)
    logp = ops.linear_logprob(h, w, y)
    max_logit = (h.double() @ w.double().t()).abs().max().item()
    assert (logp.double() - ref).abs().max().item() <= 2 ** -10 * max_logit + 1e-3


def test_chunk_sizes_follow_budget():
    assert ops.chunk_sizes(8192, 49152, 4, 64) == (341, 49152)  # 341 rows x 49152 x 4 B ≤ 64 MiB
    rows, cols = ops.chunk_sizes(8192, 128256, 2, 8)  # too few whole rows: vocabulary chunks
    assert rows == 256 and rows * cols * 2 <= 8 * 2**20 and cols < 128256


def test_torch_compile_fullgraph_matches_eager():
    h, w, y = _inputs(24, 32, 300, torch.float32, seed=4)

    def loss(hh):
        lp = ops.linear_logprob(hh, w, y)
        return torch.nn.functional.softplus(0.1 * lp.sum()) + lp.exp().mean()

    he = h.clone().requires_grad_()
    le = loss(he)
    le.backward()
    hc = h.clone().requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    lc = compiled(hc)
    lc.backward()
    assert rel_err(lc, le) <= 1e-6 and rel_err(hc.grad, he.grad) <= 1e-6


def test_bad_inputs_are_named():
    h, w, y = _inputs(4, 8, 20, torch.float32)
    with pytest.raises(RuntimeError, match="hidden sizes differ"):
        torch.ops.lune_fast.linear_logprob(h, w[:, :4], y, 4, 20, False)
    with pytest.raises(RuntimeError, match="y must be int64"):
        torch.ops.lune_fast.linear_logprob(h, w, y.int(), 4, 20, False)
    with pytest.raises(ValueError, match="must be frozen"):
        ops.linear_logprob(h, w.clone().requires_grad_(), y)
