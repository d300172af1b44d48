"""The persistent TMA GEMM (lune_fast.kernels.tma_gemm) against a float64 reference, on CPU under
TRITON_INTERPRET=1 (tensor descriptors included).

Bounds: float32 1e-5 relative under the interpreter (true fp32 products; on a GPU a float32 dot is TF32, ~1e-3).
fp16 and bf16 outputs are rounded once to their 11- and 8-bit mantissas (2^-11, 2^-8 relative to the largest
entry, as rel_err measures) on top of fp32 accumulation: 2e-3 and 1e-2. bf16 runs under the interpreter only
because the kernel upcasts there (triton #11584); on a GPU it is the tensor-core path.
"""
import pytest
import torch

from conftest import rel_err

G = pytest.importorskip("lune_fast.kernels.tma_gemm")
pytestmark = pytest.mark.skipif(not G.HAVE_TRITON or not (torch.cuda.is_available() or G.interpreting()),
                                reason="triton unavailable (no GPU and no interpreter)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5 if DEV == "cpu" else 5e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# M, K, N: off the 32-wide interpreter blocks everywhere, every row a multiple of 16 bytes in 2-byte dtypes
SHAPES = [(37, 72, 40), (129, 40, 104), (5, 96, 24)]


def _operands(M, K, N, rp, dtype, trans_b, trans_q, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    a = mk(M, K).to(dtype)
    b = (mk(N, K) if trans_b else mk(K, N)).mul(K ** -0.5).to(dtype)
    p = mk(M, rp)  # float32, like the saved S / dS
    q = (mk(N, rp) if trans_q else mk(rp, N)).mul(0.3).to(dtype)
    bias = mk(N).to(dtype)
    return a, b, p, q, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [(True, True), (False, False)], ids=["fwd_layout", "dx_layout"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_with_rank_term_poisoned_output(shape, layout, dtype):
    M, K, N = shape
    trans_b, trans_q = layout
    a, b, p, q, bias = _operands(M, K, N, 16, dtype, trans_b, trans_q, seed=M + K)
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    c = G.gemm(a, b, p, q, bias, trans_b=trans_b, trans_q=trans_q, out=out)
    ref = G.gemm_reference(a.double(), b.double(), p.double(), q.double(), bias.double(), trans_b, trans_q)
    assert c.dtype == dtype and not c.isnan().any()
    assert rel_err(c, ref) <= TOL[dtype]


@pytest.mark.parametrize("rp", [16, 64])
def test_rank_term_alone_moves_the_output(rp):
    """The rank-r term is really added: with it the output differs from the plain product by exactly P·Qᵀ."""
    a, b, p, q, _ = _operands(40, 64, 48, rp, torch.float32, True, True, seed=rp)
    plain = G.gemm(a, b)
    full = G.gemm(a, b, p, q)
    assert rel_err(plain, G.gemm_reference(a.double(), b.double())) <= TOL[torch.float32]
    assert rel_err(full - plain, p.double() @ q.double().t()) <= 1e-4


def test_persistent_grid_covers_every_tile(monkeypatch):
    """Fewer programs than tiles (the persistent launch): each program strides over several tiles and none is
    left unwritten (NaN-poisoned output)."""
    monkeypatch.setattr(G, "num_sms", lambda: 2)
    a, b, p, q, bias = _operands(100, 64, 72, 16, torch.float32, True, True, seed=5)
    out = torch.full((100, 72), float("nan"), device=DEV)
    c = G.gemm(a, b, p, q, bias, out=out)
    assert rel_err(c, G.gemm_reference(a.double(), b.double(), p.double(), q.double(), bias.double())) <= 1e-5


def test_tma_compatible():
    assert G.tma_compatible(torch.empty(5, 8, dtype=torch.bfloat16))
    assert not G.tma_compatible(torch.empty(5, 9, dtype=torch.bfloat16))  # 18-byte rows
    assert not G.tma_compatible(torch.empty(8, 5).t())  # columns not contiguous
    assert not G.tma_compatible(torch.empty(40, dtype=torch.bfloat16)[1:33].view(4, 8))  # base off 16 bytes


def test_configs_that_overflow_shared_memory_are_pruned(monkeypatch):
    """At rank 64 a flattened 128x256 tile needs its own rank-r buffers: 278,568 bytes compiled for sm_90a,
    over the H200's 227 KB a block, so it is dropped while the non-flattened one (213,016) stays. fp32 operands
    double the tiles and drop more; whatever is kept fits."""
    limit = 232448
    monkeypatch.setattr(G, "shared_limit", lambda: limit)
    configs = G.make_configs(G.CONFIGS["hopper"])

    def need(c, esize):
        k = c.kwargs
        return G.shared_bytes(k["BM"], k["BN"], k["BK"], c.num_stages, 64, esize, k["FLATTEN"])

    def tiles(kept):
        return {(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["FLATTEN"]) for c in kept}

    kept32 = G.fits(configs, {"a_ptr": torch.empty(1), "RP": 64})
    kept16 = G.fits(configs, {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "RP": 64})
    assert kept32 and all(need(c, 4) <= limit for c in kept32) and len(kept32) < len(kept16)
    assert all(need(c, 2) <= limit for c in kept16)
    assert (128, 256, False) in tiles(kept16) and (128, 256, True) not in tiles(kept16)
