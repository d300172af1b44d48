"""The frozen projections' packed product (lune_fast.kernels.frozen_linear) against a float64 reference: the
same error as torch's own bf16 / float32 product, the weight's changes seen, the gradient of x, the fallbacks."""
import pytest
import torch

import lune_fast.kernels.frozen_linear as fl
from conftest import rel_err
from lune_fast.kernels.frozen_linear import frozen_linear, packing_supported, reference

numerics = pytest.mark.numerics
needs_packing = pytest.mark.skipif(not packing_supported(),
                                   reason="oneDNN cannot prepack bf16 weights on this CPU (or under this ISA limit)")


def _bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@numerics
@needs_packing
@pytest.mark.parametrize("out_f,in_f", [(1536, 576), (576, 1536), (192, 576), (4099, 64)])
@pytest.mark.parametrize("rows", [1, 3, 64, 257])
def test_packed_product_is_as_exact_as_torch_bf16(out_f, in_f, rows):
    w, x, b = _bf16(out_f, in_f, seed=1), _bf16(rows, in_f, seed=2), _bf16(out_f, seed=3)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    ours, torch_bf16 = frozen_linear(x, w, b), reference(x, w, b)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out_f) and torch.isfinite(ours).all()
    # bf16 output rounding is 2^-8 relative; torch's own product is the yardstick of the accumulation
    assert rel_err(ours, exact) <= 2 * rel_err(torch_bf16, exact) + 2 ** -8


@needs_packing
def test_leading_dims_and_strided_input():
    w = _bf16(96, 64)
    x = _bf16(5, 64, 7, seed=4).transpose(1, 2)  # [5, 7, 64], not contiguous
    exact = x.double() @ w.double().t()
    assert frozen_linear(x, w).shape == (5, 7, 96)
    assert rel_err(frozen_linear(x, w), exact) <= 2 * rel_err(reference(x, w), exact) + 2 ** -8


@needs_packing
def test_a_changed_weight_is_packed_again():
    w = torch.nn.Parameter(_bf16(128, 64), requires_grad=False)
    x = _bf16(4, 64, seed=5)
    before = frozen_linear(x, w)
    with torch.no_grad():
        w.mul_(-2)  # in place: the version counter moves
    assert torch.allclose(frozen_linear(x, w).float(), -2 * before.float(), rtol=2 ** -7, atol=1e-2)
    w.data = _bf16(128, 64, seed=6)  # another storage
    assert rel_err(frozen_linear(x, w), reference(x, w)) <= 2 ** -7


@needs_packing
def test_gradient_of_x_is_torch_linear_s():
    w = _bf16(300, 64)
    x1 = _bf16(9, 64, seed=7).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    g = _bf16(9, 300, seed=8)
    frozen_linear(x1, w).backward(g)
    reference(x2, w).backward(g)
    assert torch.equal(x1.grad, x2.grad)


needs_float32_packing = pytest.mark.skipif(not packing_supported(torch.float32),
                                           reason="oneDNN cannot prepack float32 weights on this CPU")


@numerics
@needs_float32_packing
@pytest.mark.parametrize("out_f,in_f,rows", [(1536, 576, 1), (576, 1536, 8), (576, 576, 32), (4099, 1024, 3),
                                             (4099, 1024, 100)])
def test_packed_float32_product_is_as_exact_as_torch_s(out_f, in_f, rows):
    g = torch.Generator().manual_seed(out_f + rows)
    w, x, b = (torch.randn(*s, generator=g) for s in ((out_f, in_f), (rows, in_f), (out_f,)))
    assert fl._packable(x, w)  # these are all packed (4099 x 1024 is as large as a head: at any rows)
    out = frozen_linear(x, w, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert out.shape == (rows, out_f) and torch.isfinite(out).all()
    # float32's rounding is 2^-24 relative; a sum of in_f products may gather ~sqrt(in_f) of it
    assert rel_err(out, exact) <= 2 * rel_err(reference(x, w, b), exact) + 2 ** -20


@needs_float32_packing
def test_which_float32_products_are_packed():
    """Packed only where it measured faster: a weight of 2^18 elements or more at up to 32 rows, one of 2^22 or
    more (a head) at any rows; F.linear elsewhere, bit for bit."""
    small, mid, large = torch.randn(192, 576), torch.randn(576, 576), torch.randn(4099, 1024)
    assert not fl._packable(torch.randn(8, 576), small)
    assert fl._packable(torch.randn(2, 16, 576), mid) and not fl._packable(torch.randn(3, 11, 576), mid)
    assert fl._packable(torch.randn(300, 1024), large)
    x = torch.randn(40, 576)
    assert torch.equal(frozen_linear(x, mid), reference(x, mid)) and not hasattr(mid, "_lune_packed")


def test_what_is_not_packed_is_torch_linear():
    x32, w32 = torch.randn(3, 16), torch.randn(8, 16)
    assert torch.equal(frozen_linear(x32, w32), reference(x32, w32))  # a small float32 weight
    w_trains = torch.nn.Parameter(_bf16(8, 16))
    x = _bf16(3, 16, seed=9)
    assert torch.equal(frozen_linear(x, w_trains), reference(x, w_trains))  # a weight that trains
    assert torch.equal(frozen_linear(x, w_trains.detach(), pack=False), reference(x, w_trains.detach()))
    assert not hasattr(w_trains, "_lune_packed")


@numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_logits_packed_and_not(tmp_path, monkeypatch, dtype):
    """A whole model: packed and plain products stay within the dtype's reach of the float64 logits (float32:
    the tiny model's weights are all packed, however small)."""
    from conftest import make_tiny_hf
    from lune_fast.weights import load_model

    if not packing_supported(dtype):
        pytest.skip(f"oneDNN cannot prepack {dtype} weights on this CPU (or under this ISA limit)")
    monkeypatch.setattr(fl, "FLOAT32_MIN", 0)
    monkeypatch.setattr(fl, "FLOAT32_LARGE", 0)
    folder = tmp_path / "m"
    make_tiny_hf("llama", folder)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    exact = load_model(folder, dtype=torch.float64)(ids)
    model = load_model(folder, dtype=dtype)
    model.pack_weights(True)
    packed = model(ids)
    assert any(hasattr(m.weight, "_lune_packed") for m in model.modules() if hasattr(m, "pack"))
    model.pack_weights(False)
    plain = model(ids)
    assert not any(hasattr(m.weight, "_lune_packed") for m in model.modules() if hasattr(m, "pack"))
    assert rel_err(packed, exact) <= 2 * rel_err(plain, exact) + (2 ** -7 if dtype is torch.bfloat16 else 2 ** -18)


needs_bf16_dot = pytest.mark.skipif(not fl.few_rows_supported(),
                                    reason="lune_fast._C not built, or this CPU has no AVX512-BF16")


@numerics
@needs_bf16_dot
@pytest.mark.parametrize("out_f,in_f", [(1536, 576), (576, 1536), (192, 576), (4099, 100), (7, 33)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_few_rows_product_is_as_exact_as_torch_bf16(out_f, in_f, rows):
    """The few-rows dot product (csrc/cpu/few_rows_linear.cpp) at every row block, a row count that leaves a
    remainder of W's rows, and a K that is no multiple of its 32-wide step (an output left unwritten holds
    whatever memory held: the bound against float64 catches it)."""
    w, x, b = _bf16(out_f, in_f, seed=11), _bf16(rows, in_f, seed=12), _bf16(out_f, seed=13)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    ours = torch.ops.lune_fast.few_rows_linear(x, w, b)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out_f) and torch.isfinite(ours).all()
    assert rel_err(ours, exact) <= 2 * rel_err(reference(x, w, b), exact) + 2 ** -8
    no_bias = torch.ops.lune_fast.few_rows_linear(x, w, None)
    assert rel_err(no_bias, x.double() @ w.double().t()) <= 2 * rel_err(reference(x, w), x.double() @ w.double().t()) + 2 ** -8


@needs_bf16_dot
def test_a_rows_few_rows_product_does_not_depend_on_the_rows_beside_it_or_the_threads():
    """One prompt decoded alone or among others, on 1 or 2 threads: the same bits (each output is one dot
    product summed in one order)."""
    w, x = _bf16(1000, 576, seed=14), _bf16(8, 576, seed=15)
    together = torch.ops.lune_fast.few_rows_linear(x, w, None)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for r in range(8):
                assert torch.equal(torch.ops.lune_fast.few_rows_linear(x[r:r + 1], w, None), together[r:r + 1])
            assert torch.equal(torch.ops.lune_fast.few_rows_linear(x[2:5], w, None), together[2:5])
    finally:
        torch.set_num_threads(threads)


@needs_bf16_dot
def test_which_bf16_products_take_the_few_rows_op(monkeypatch):
    """Up to FEW_ROWS rows without a gradient (a decoding step), in any leading shape; more rows, an input that
    needs its gradient, or pack=False: as before."""
    calls = []
    real = torch.ops.lune_fast.few_rows_linear

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(torch.ops.lune_fast, "few_rows_linear", Spy())
    w = _bf16(256, 64, seed=16)
    x = _bf16(1, 1, 64, seed=17)
    assert torch.equal(frozen_linear(x, w), real(x, w, None)) and calls == [(1, 1, 64)]
    frozen_linear(_bf16(fl.FEW_ROWS + 1, 64), w)
    frozen_linear(x, w, pack=False)
    frozen_linear(x.clone().requires_grad_(), w)
    assert calls == [(1, 1, 64)]
    with torch.no_grad():
        frozen_linear(x.clone().requires_grad_(), w)
    assert len(calls) == 2


@needs_bf16_dot
def test_few_rows_op_refuses_what_it_cannot_do():
    w = _bf16(16, 64)
    with pytest.raises(RuntimeError, match="at most"):
        torch.ops.lune_fast.few_rows_linear(_bf16(9, 64), w, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.lune_fast.few_rows_linear(torch.randn(1, 64), w, None)
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.lune_fast.few_rows_linear(_bf16(1, 63), w, None)
