"""LoRA: the CPU autograd.Function against float64 autograd, target/layer parsing, merge/unmerge."""
import pytest
import torch

from conftest import make_tiny_hf, rel_err
from lune_fast import lora
from lune_fast.kernels.lora_linear import LoRALinearTorch
from lune_fast.weights import load_model

pytestmark = pytest.mark.numerics  # run again under other instruction sets (Makefile)


def _plain(x, w, b, A, B, s):
    y = x @ w.t() + s * (x @ A.t()) @ B.t()
    return y + b if b is not None else y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("r", [4, 16])
def test_function_matches_float64_autograd(bias, r):
    torch.manual_seed(0)
    N, din, dout, s = 37, 48, 40, 2.0
    x = torch.randn(3, N, din)
    w, b = torch.randn(dout, din), (torch.randn(dout) if bias else None)
    A, B = torch.randn(r, din) * 0.1, torch.randn(dout, r) * 0.1
    dy = torch.randn(3, N, dout)

    def run(fn, dt):
        xs = x.detach().to(dt).clone().requires_grad_()
        As, Bs = A.detach().to(dt).clone().requires_grad_(), B.detach().to(dt).clone().requires_grad_()
        y = fn(xs, w.to(dt), None if b is None else b.to(dt), As, Bs, s)
        y.backward(dy.to(dt))
        return y, xs.grad, As.grad, Bs.grad

    ours = run(LoRALinearTorch.apply, torch.float32)
    ref = run(_plain, torch.float64)
    for name, a, e in zip(("y", "dx", "dA", "dB"), ours, ref):
        assert rel_err(a, e) <= 1e-5, name


def test_bf16_activations_keep_fp32_master_grads():
    torch.manual_seed(0)
    x = torch.randn(20, 32).bfloat16().requires_grad_()
    w = torch.randn(24, 32).bfloat16()
    A = (torch.randn(8, 32) * 0.1).requires_grad_()
    B = (torch.randn(24, 8) * 0.1).requires_grad_()
    y = LoRALinearTorch.apply(x, w, None, A, B, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    xa, wa = x.detach().double(), w.double()
    Ad, Bd = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    _plain(xa, wa, None, Ad, Bd, 2.0).sum().backward()
    # bf16 products: 8 mantissa bits, so ~1e-2 relative is the expected size of the error
    assert rel_err(A.grad, Ad.grad) <= 2e-2 and rel_err(B.grad, Bd.grad) <= 2e-2


def test_a_fixed_A_keeps_no_input_for_the_backward():
    """A keyed adapter's A never trains: the op then keeps x·Aᵀ but not x (dA is the only reader of x), and dx
    and dB are the same as where A trains."""
    torch.manual_seed(0)
    x = torch.randn(50, 48).bfloat16()
    w = torch.randn(40, 48).bfloat16()
    A, B = torch.randn(6, 48) * 0.1, torch.randn(40, 6) * 0.1
    dy = torch.randn(50, 40).bfloat16()

    def run(a_trains):
        kept = []
        xs, As, Bs = x.clone().requires_grad_(), A.clone().requires_grad_(a_trains), B.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            y = LoRALinearTorch.apply(xs, w, None, As, Bs, 2.0)
        y.backward(dy)
        return xs.grad, Bs.grad, sum(t.numel() for t in kept if t.shape == x.shape)

    dx, dB, kept_x = run(True)
    dx_fixed, dB_fixed, kept_x_fixed = run(False)
    assert kept_x == x.numel() and kept_x_fixed == 0
    assert torch.equal(dx, dx_fixed) and torch.equal(dB, dB_fixed)


def test_parse_targets_and_layers():
    assert lora.parse_targets("q,v") == ("q", "v")
    assert lora.parse_targets("mlp") == ("gate", "up", "down")
    assert lora.parse_targets(["down_proj", "q_proj"]) == ("q", "down")
    assert lora.parse_layers("8-10,3", 30) == (3, 8, 9, 10)
    with pytest.raises(lora.AdapterError, match="unknown LoRA target 'qq'"):
        lora.parse_targets("qq")
    with pytest.raises(lora.AdapterError, match=r"layers \[30, 31\] are outside the model's 0-29"):
        lora.parse_layers("28-31", 30)
    with pytest.raises(lora.AdapterError, match="empty"):
        lora.parse_layers("9-3", 30)


def test_attach_starts_as_base_and_merge_roundtrip(tmp_path):
    make_tiny_hf("qwen2", tmp_path)  # q/k/v biases
    model = load_model(tmp_path)
    ids = torch.randint(0, 211, (2, 11))
    with torch.no_grad():
        base = model(ids)
    adapters = lora.attach(model, lora.LoraSettings(rank=4, alpha=8, targets=("q", "v", "down"), layers=(1, 2)))
    assert sorted(adapters) == ["layers.1.mlp.down_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj",
                                "layers.2.mlp.down_proj", "layers.2.self_attn.q_proj", "layers.2.self_attn.v_proj"]
    with torch.no_grad():
        assert rel_err(model(ids), base) == 0.0  # B = 0
        for m in adapters.values():
            m.lora_B.normal_(0, 0.5)
        adapted = model(ids)
        assert rel_err(adapted, base) > 1e-3
        with lora.disabled(model):
            assert rel_err(model(ids), base) <= 1e-6
        lora.merge(model)
        assert rel_err(model(ids), adapted) <= 1e-5
        lora.unmerge(model)
        assert rel_err(model(ids), adapted) <= 1e-5
        lora.detach(model)
        assert rel_err(model(ids), base) <= 1e-6
    assert not lora.adapters_of(model)


def test_one_dispatch_point_for_the_lora_op():
    """Every adapted projection reaches the op through lora_linear(backend=): "auto" is the torch chain on any
    device (it beat the Triton kernels on an H200), a backend that does not exist is refused by name."""
    from lune_fast.kernels.lora_linear import lora_linear, lora_linear_reference, resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="must be one of auto, torch, triton, got 'cuda'"):
        resolve_backend("cuda", torch.device("cpu"))
    x, w, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    assert rel_err(lora_linear(x, w, None, A, B, 0.5, "torch"), lora_linear_reference(x, w, None, A, B, 0.5)) <= 1e-6
    model_settings = lora.LoraSettings(rank=2, alpha=2, targets=("down",), layers=(0,))
    from lune_fast.model import ModelConfig, Transformer

    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                                 "num_hidden_layers": 1, "num_attention_heads": 2})
    m = Transformer(cfg)
    with pytest.raises(ValueError, match="must be one of"):
        lora.attach(m, model_settings, backend="fast")
    assert all(a.backend == "torch" for a in lora.attach(m, model_settings).values())
