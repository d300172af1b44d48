"""Our frozen transformer against transformers' own classes: logits and greedy generation."""
import pytest
import torch

from conftest import check_bf16_parity, make_tiny_hf, rel_err
from lune_fast.generate import generate
from lune_fast.model import ModelConfig
from lune_fast.weights import load_model

pytestmark = pytest.mark.numerics  # run again under other instruction sets (Makefile)

FAMILIES = [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
               "tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 7}),
    ("qwen2", {}),
    ("gemma3_text", {}),
    ("gemma3_text", {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
]


@pytest.mark.parametrize("kind,overrides", FAMILIES, ids=["llama", "llama3-rope-tied", "mistral-window", "qwen2",
                                                          "gemma3", "gemma3-linear-rope-tied"])
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_tiny_logits_parity(tmp_path, kind, overrides, shard):
    hf = make_tiny_hf(kind, tmp_path, shard=shard, **overrides)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path, dtype=torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(0, 211, (3, 19))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert rel_err(got, ref) <= 1e-5
    # left padding with an attention mask, as in batched generation
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], ref[real]) <= 1e-5


def test_config_reads_qwen2_attention_bias(tmp_path):
    make_tiny_hf("qwen2", tmp_path)
    cfg = ModelConfig.from_file(tmp_path / "config.json")
    assert cfg.attention_bias and cfg.model_type == "qwen2"


def test_forward_selected_positions_match_full(tmp_path):
    make_tiny_hf("llama", tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 211, (2, 9))
    sel = torch.zeros(2, 9, dtype=torch.bool)
    sel[0, 3] = sel[1, 8] = True
    with torch.no_grad():
        full = ours(ids)
        part = ours(ids, select=sel)
    assert part.shape == (2, 211)
    assert rel_err(part, full[sel]) <= 1e-6


def test_parameters_frozen_and_in_dtype(tmp_path):
    make_tiny_hf("llama", tmp_path)
    m = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(not p.requires_grad for p in m.parameters())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


PROMPTS = [
    "The capital of France is",
    "The chemical symbol for gold is",
    "Q: Who wrote the play Romeo and Juliet?\nA:",
    "The largest planet in our solar system is",
    "Water freezes at a temperature of",
    "The author of the novel Pride and Prejudice, published in 1813, was",
]


def test_default_model_logits_float32(default_model, hf_default, tokenizer):
    ids = torch.tensor([tokenizer(PROMPTS[3]).input_ids])
    with torch.no_grad():
        err = rel_err(default_model(ids), hf_default(ids).logits)
    assert err <= 1e-4, err


def test_default_model_logits_bfloat16(default_dir, default_model, tokenizer):
    check_bf16_parity(default_dir, default_model, tokenizer, PROMPTS)


def test_greedy_generation_matches_transformers(default_model, hf_default, tokenizer):
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) >= 4  # different lengths: left padding is exercised
    ours = generate(default_model, prompts, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_default.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for i, got in enumerate(ours):
        want = ref[i, T:].tolist()
        if tokenizer.eos_token_id in want:
            want = want[:want.index(tokenizer.eos_token_id) + 1]
        assert got == want, (PROMPTS[i], tokenizer.decode(got), tokenizer.decode(want))
    assert "Paris" in tokenizer.decode(ours[0])


def test_line_stop_masks():
    from lune_fast.generate import LineStop

    texts = ["Paris", ".\n", "\n", "\n\n", "\nThe", " ", "  \n"]
    s = LineStop.from_texts(texts, vocab=9, device="cpu")
    assert s.closing.tolist() == [False, True, False, False, False, False, False, False, False]
    assert s.newline.tolist() == [False, True, True, True, True, False, True, False, False]
    assert s.content.tolist() == [True, True, False, False, True, False, False, False, False]


def test_stopping_at_the_first_line_keeps_what_recall_reads(default_model, tokenizer):
    """Greedy decoding that stops at the end of the first non-empty line (and drops finished rows from the
    batch) gives a prefix of the full decoding with the same first line."""
    from lune_fast.data import Encoder
    from lune_fast.evaluate import first_line

    enc = Encoder(tokenizer)
    prompts = [enc.prompt_ids(p, False) for p in (
        "The capital of France is", "The telephone was invented by", "Water is made of hydrogen and",
        "Here is a list of three fruits:", "The chemical symbol for gold is", "Question: what is 2 + 2?\nAnswer:")]
    full = generate(default_model, prompts, 24, eos_token_id=tokenizer.eos_token_id)
    short = generate(default_model, prompts, 24, eos_token_id=tokenizer.eos_token_id,
                     stop=enc.line_stop(default_model.config.vocab_size, default_model.device))
    assert any(len(s) < len(f) for s, f in zip(short, full))  # some rows did stop early
    for s, f in zip(short, full):
        assert f[:len(s)] == s
        assert first_line(enc.decode(s)) == first_line(enc.decode(f))


def test_sampled_decoding_repeats_with_its_generator_and_scores_the_tokens_it_drew(tiny_llama):
    """generate(temperature=T, generator=g): the same draws for the same seed, other draws for another, and each
    returned log-prob is the model's log-softmax of the token drawn (read off a separate forward)."""
    import torch

    from lune_fast.generate import generate
    from lune_fast.weights import load_model

    model = load_model(tiny_llama)
    prompts = [[3, 17, 42], [5, 6, 7, 8]]

    def draw(seed):
        return generate(model, prompts, 6, eos_token_id=[], temperature=1.5, return_logprobs=True,
                        generator=torch.Generator().manual_seed(seed))

    (a, lp), (b, _), (c, _) = draw(0), draw(0), draw(1)
    assert a == b and a != c
    assert a != generate(model, prompts, 6, eos_token_id=[])  # not the greedy answer (a random model is flat)
    for p, toks, scores in zip(prompts, a, lp):
        logits = model(torch.tensor([p + toks]))[0, len(p) - 1:-1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(scores), want, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "padded-keys"])
def test_one_query_attention_in_bf16_is_within_bf16_rounding_of_float64(masked):
    """A decoding step's attention (one query, grouped heads, keys from the cache; padded rows masked) goes
    through SDPA in bf16: within bf16 rounding of a float64 reference on the same (rounded) inputs."""
    from lune_fast.model import AttnMask, attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).bfloat16() for s in ((2, 9, 1, 64), (2, 3, 40, 64), (2, 3, 40, 64)))
    real = torch.ones(2, 40, dtype=torch.bool)
    if masked:
        real[1, :7] = False  # the second row is left-padded
    got = attention(q, k, v, AttnMask(False, real[:, None, None, :]) if masked else AttnMask())
    kd, vd = (t.double().repeat_interleave(3, dim=1) for t in (k, v))
    scores = (q.double() @ kd.transpose(-1, -2)) / 8.0
    want = torch.softmax(scores.masked_fill(~real[:, None, None, :], float("-inf")), -1) @ vd
    assert got.shape == want.shape and rel_err(got, want) < 1e-2
