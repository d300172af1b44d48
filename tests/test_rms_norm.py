"""The one-op RMSNorm (csrc/cpu/rms_norm.cpp, lune_fast.ops.rms_norm) against the model's torch path and a
float64 reference: Llama's (cast, then times w) and Gemma's (times 1 + w in float32) arithmetic, bf16 and float32,
rows of any leading shape; where a gradient is needed the torch path runs."""
import pytest
import torch

from conftest import rel_err
from lune_fast import ops
from lune_fast.model import RMSNorm

pytestmark = pytest.mark.numerics
needs_op = pytest.mark.skipif(ops.extension() is None, reason="lune_fast._C was not built")


def _torch_path(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.offset:
        return (xf * (norm.offset + norm.weight.float())).to(x.dtype)
    return norm.weight * xf.to(x.dtype)


def _exact(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps)
    return xd * (norm.offset + norm.weight.double())


@needs_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (300, 576), (2, 5, 4, 64)])
def test_one_op_norm_is_the_torch_paths_arithmetic(dtype, offset, shape):
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    norm = RMSNorm(shape[-1], 1e-5, offset).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.5 + 1.0)
        x = (torch.randn(*shape, generator=g) * 3.0).to(dtype)
        got = norm(x)
    want = _torch_path(norm, x)
    assert got.dtype == dtype and got.shape == x.shape and torch.isfinite(got).all()
    # the same steps; only the mean square's summation order differs (float32): a rounding step at most
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -21
    assert rel_err(got, want) <= ulp
    assert rel_err(got, _exact(norm, x)) <= 2 * rel_err(want, _exact(norm, x)) + ulp


@needs_op
def test_a_norm_whose_input_needs_a_gradient_takes_the_torch_path():
    norm = RMSNorm(64, 1e-6).bfloat16()
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    assert ops.rms_norm(x, norm.weight, norm.eps, norm.offset) is None
    norm(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert ops.rms_norm(x, norm.weight, norm.eps, norm.offset) is not None
