"""A decoding step through a whole layer in one op (csrc/cpu/decode_layer.cpp, Block.decode_step): the same
kernels as the modules, so the same bits — greedy tokens and their log-probabilities equal to the module path's
on the embedded model and on a random Qwen2 (q/k/v biases, padded prompts, an adapter on down_proj); layers it
does not cover (an adapter on another projection, Gemma 3) take the module path."""
import pytest
import torch

import lune_fast.kernels.frozen_linear as fl
from conftest import make_tiny_hf
from lune_fast import lora
from lune_fast.generate import generate
from lune_fast.model import Block
from lune_fast.weights import load_model

pytestmark = pytest.mark.skipif(not fl.few_rows_supported(),
                                reason="lune_fast._C not built, or this CPU has no AVX512-BF16 (no few-rows product)")


REAL = Block.decode_step


def _decode_both(model, prompts, monkeypatch, tokens=10):
    calls = []
    real = REAL

    def spy(self, *a):
        out = real(self, *a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(Block, "decode_step", spy)
    fused = generate(model, prompts, tokens, eos_token_id=[], return_logprobs=True)
    monkeypatch.setattr(Block, "decode_step", lambda self, *a: None)
    plain = generate(model, prompts, tokens, eos_token_id=[], return_logprobs=True)
    return fused, plain, calls


def test_the_one_op_layer_decodes_the_module_paths_bits(default_dir, tokenizer, monkeypatch):
    model = load_model(default_dir, dtype=torch.bfloat16)
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "A baby cow is called a")]
    for rows in (prompts[:1], prompts):  # one prompt, and two left-padded ones (the key mask)
        fused, plain, calls = _decode_both(model, rows, monkeypatch)
        assert fused == plain and all(calls) and len(calls) == model.config.num_hidden_layers * 9


def test_qwen2_biases_and_where_the_op_does_not_apply(tmp_path, monkeypatch):
    make_tiny_hf("qwen2", tmp_path / "q")
    model = load_model(tmp_path / "q", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (4, 9)]
    fused, plain, calls = _decode_both(model, prompts, monkeypatch)
    assert fused == plain and all(calls)
    # an adapter on down_proj (with a lifelong state's earlier ranks beside it): the op adds its ranks as
    # LoRALinear's inference does, bit for bit; an adapter on another projection: that layer takes the modules
    g = torch.Generator().manual_seed(3)
    (m,) = lora.attach(model, lora.LoraSettings(rank=2, targets=("down",), layers=(1,)), seed=0).values()
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    m.set_earlier(torch.randn(5, m.in_features, generator=g), torch.randn(m.out_features, 5, generator=g))
    fused, plain, calls = _decode_both(model, prompts, monkeypatch)
    assert fused == plain and all(calls)
    with lora.disabled(model):
        off, _, _ = _decode_both(model, prompts, monkeypatch)
    assert off[0] != fused[0]  # the ranks change what is said: the op did add them
    lora.attach(model, lora.LoraSettings(rank=2, targets=("up",), layers=(1,)), seed=0)
    fused, plain, calls = _decode_both(model, prompts, monkeypatch)
    assert fused == plain and calls.count(False) == len(calls) // 3
    lora.detach(model)
    make_tiny_hf("gemma3_text", tmp_path / "g")
    gemma = load_model(tmp_path / "g", dtype=torch.bfloat16)
    _, _, calls = _decode_both(gemma, prompts, monkeypatch)
    assert calls and not any(calls)
