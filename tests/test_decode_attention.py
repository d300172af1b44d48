"""One decoding step's attention in one op (csrc/cpu/decode_attention.cpp, lune_fast.ops.decode_attention) against
the model's torch path and a float64 reference: the cache holds the rope'd key bit for bit as the torch path
rounds it, the output is within the dtype's rounding of float64 attention, for grouped heads, padded keys and a
sliding window; positions past the step are never read (they hold NaN); a whole model decodes the same tokens
with and without it."""
import pytest
import torch

import lune_fast.model as model_module
from conftest import make_tiny_hf, rel_err
from lune_fast import ops
from lune_fast.generate import generate
from lune_fast.model import AttnMask, attention, rotate_half
from lune_fast.weights import load_model

pytestmark = [pytest.mark.numerics, pytest.mark.skipif(ops.extension() is None, reason="lune_fast._C was not built")]


def _rope(x, cos, sin):  # the model's torch path
    return x * cos + rotate_half(x) * sin


def _case(dtype, B=2, H=8, KVH=2, D=64, start=29, max_len=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, KVH, D, generator=g).to(dtype) for _ in range(2))
    pos = torch.tensor([[start], [start - 3]])[:B]
    freqs = pos[..., None].float() * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # [B, 1, D]
    caches = [torch.full((B, KVH, max_len, D), float("nan"), dtype=dtype) for _ in range(2)]
    for c in caches:
        c[:, :, :start] = torch.randn(B, KVH, start, D, generator=g).to(dtype)
    return q, k, v, cos, sin, caches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keys", ["all", "padded", "window"])
def test_decode_step_is_the_torch_paths_rope_and_within_rounding_of_float64_attention(dtype, keys):
    B, H, KVH, D, start = 2, 8, 2, 64, 29
    q, k, v, cos, sin, (ck, cv) = _case(dtype)
    allowed = None
    if keys == "padded":
        allowed = torch.ones(B, start + 1, dtype=torch.bool)
        allowed[1, :6] = False  # the second row is left-padded
    window = 7 if keys == "window" else 0
    out = ops.decode_attention(q, k, v, cos.view(B, D), sin.view(B, D), ck, cv, start, allowed, window, D ** -0.5)
    assert out.shape == (B, H, D) and out.dtype == dtype and torch.isfinite(out).all()
    # the cache: the torch path's rope of k, bit for bit, and v as it is; nothing after `start` written
    q4, k4 = q[:, :, None], k[:, :, None]
    assert torch.equal(ck[:, :, start], _rope(k4, cos[:, None], sin[:, None])[:, :, 0])
    assert torch.equal(cv[:, :, start], v)
    assert torch.isnan(ck[:, :, start + 1:]).all()
    # the attention: float64 on the same rounded inputs
    qr = _rope(q4, cos[:, None], sin[:, None])
    keep = torch.ones(B, start + 1, dtype=torch.bool) if allowed is None else allowed.clone()
    if window:
        keep[:, :start + 1 - window] = False
    kd, vd = (c[:, :, :start + 1].double().repeat_interleave(H // KVH, dim=1) for c in (ck, cv))
    scores = (qr.double() @ kd.transpose(-1, -2)) * D ** -0.5
    want = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), -1) @ vd
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20
    assert rel_err(out, want[:, :, 0]) <= 2 * ulp
    # and the torch path (SDPA) on the same step
    mask = AttnMask(False, keep[:, None, None, :])
    torch_path = attention(qr, ck[:, :, :start + 1], cv[:, :, :start + 1], mask, D ** -0.5)
    assert rel_err(out, torch_path[:, :, 0]) <= 4 * ulp


def test_where_the_op_does_not_apply_nothing_is_written():
    q, k, v, cos, sin, (ck, cv) = _case(torch.bfloat16)
    before = ck.clone()
    assert ops.decode_attention(q.requires_grad_(), k, v, cos.view(2, -1), sin.view(2, -1), ck, cv, 29, None, 0,
                                0.125) is None
    assert torch.equal(ck.nan_to_num(), before.nan_to_num())
    with pytest.raises(RuntimeError, match="past the cache"):
        torch.ops.lune_fast.decode_attention(q.detach(), k, v, cos, sin, ck, cv, 40, None, 0, 0.125)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("gemma3_text", torch.float32),
                                        ("llama", torch.bfloat16)])
def test_a_model_decodes_alike_with_and_without_the_op(tmp_path, monkeypatch, kind, dtype):
    """Greedy decoding of padded prompts (Gemma 3: sliding windows shorter than the text, q/k norms, its own
    scale): the same tokens, and log-probabilities within the dtype's reach, with the op and with the torch path."""
    make_tiny_hf(kind, tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 11, 8)]
    calls = []
    real = ops.decode_attention

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(model_module.Block, "decode_step", lambda self, *a: None)  # the modules' path, not the layer op
    monkeypatch.setattr(model_module, "decode_attention", spy)
    fused, lp_fused = generate(model, prompts, 12, eos_token_id=[], return_logprobs=True)
    assert calls
    monkeypatch.setattr(model_module, "decode_attention", lambda *a: None)
    plain, lp_plain = generate(model, prompts, 12, eos_token_id=[], return_logprobs=True)
    if dtype == torch.float32:
        assert fused == plain
        assert max(abs(a - b) for x, y in zip(lp_fused, lp_plain) for a, b in zip(x, y)) < 1e-4
    else:  # a random bf16 model is flat: a near-tie may go either way; the first step's must agree
        assert [f[0] for f in fused] == [p[0] for p in plain]
