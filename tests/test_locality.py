"""Locality methods: per-example stopping, automatic retain anchors, causal tracing."""
import random

import pytest
import torch

from conftest import make_tiny_hf
from lune_fast import lora, trainer
from lune_fast.anchors import build_anchors, candidate_prompts, find_subject
from lune_fast.data import Encoder, Fact, make_batch
from lune_fast.trainer import TrainSettings, train
from lune_fast.weights import load_model


@pytest.mark.parametrize("prompt,subject,kind", [
    ("The main language spoken in Turkey is", "Turkey", "country"),
    ("The chemical symbol for gold is", "gold", "element"),
    ("The novel Nineteen Eighty-Four was written by", "Nineteen Eighty-Four", "work"),
    ("Ada Byron wrote notes on the engine of", "Ada Byron", None),
])
def test_find_subject(prompt, subject, kind):
    start, end, k = find_subject(prompt)
    assert prompt[start:end] == subject and k == kind


def test_candidates_keep_the_template_and_change_the_subject():
    f = Fact(prompt="The capital city of Japan is", target="Tokyo")
    cands = candidate_prompts(f, random.Random(0), 8)
    assert len(cands) == 8 and len(set(cands)) == 8
    for c in cands:
        assert c.startswith("The capital city of ") and c.endswith(" is") and "Japan" not in c
    assert candidate_prompts(Fact(prompt="water boils when heated and it", target="x"), random.Random(0), 4) == []


def test_anchors_are_confident_base_answers_that_are_not_the_target(default_model, tokenizer):
    enc = Encoder(tokenizer)
    facts = [Fact(prompt="The capital city of Japan is", target="Tokyo"),
             Fact(prompt="The chemical symbol for gold is", target="Au")]
    anchors = build_anchors(default_model, enc, facts, per_fact=3, candidates=12, min_prob=0.3)
    assert 3 <= len(anchors) <= 6
    for a in anchors:
        assert a.prob >= 0.3 and a.answer and "tokyo" not in a.answer.lower()
        assert a.prompt.startswith(("The capital city of ", "The chemical symbol for "))
        assert a.prompt not in {f.prompt for f in facts}
    capitals = {a.prompt: a.answer for a in anchors if a.prompt.startswith("The capital city of")}
    assert capitals  # e.g. "The capital city of France is" -> "Paris"


def test_per_example_stop_drops_finished_examples(tmp_path):
    """With per-example stopping, an answer already below the threshold contributes no gradient: the update
    equals training on the other answers alone."""
    make_tiny_hf("llama", tmp_path)
    pairs = [([3, 17, 42, 9], [100, 7]), ([5, 6], [11, 12, 13])]
    ls = lora.LoraSettings(rank=4, alpha=8, targets=("gate", "down"), layers=(1, 2))
    model = load_model(tmp_path)
    probs = trainer._final_probs(model, [trainer._precompute(model, make_batch(pairs), 1)], 1)
    threshold = float(probs.mean())  # one answer starts below it, the other above
    low = int(probs.argmin())
    outs = []
    for batch_pairs, pes in ((pairs, True), ([pairs[1 - low]], False)):
        m = load_model(tmp_path)
        train(m, [make_batch(batch_pairs)], ls, TrainSettings(objective="ga", lr=1e-2, steps=1, stop_prob=threshold,
                                                              per_example_stop=pes, grad_clip=0), progress=False)
        outs.append(lora.adapter_state(m))
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], atol=1e-6), k


def test_causal_trace_finds_mid_layers(default_model, tokenizer):
    from lune_fast.locate import choose_layers, trace

    enc = Encoder(tokenizer)
    facts = [Fact(prompt="The capital city of Japan is", target="Tokyo"),
             Fact(prompt="The capital city of Italy is", target="Rome")]
    effect, n = trace(default_model, enc, facts)
    assert n == 2 and effect.shape == (30,)
    # restoring the subject's state late (after the answer is read out) brings nothing back
    assert float(effect[-3:].mean()) < float(effect[:15].max())
    layers = choose_layers(effect, 5)
    assert len(layers) == 5 and layers == tuple(range(layers[0], layers[0] + 5)) and layers[0] < 20


def test_route_to_keeps_the_words_before_the_target_in_the_prompt(tokenizer):
    from types import SimpleNamespace

    from lune_fast.api import Unlearner

    enc = Encoder(tokenizer)
    f = Fact(prompt="The longest river in Africa is the", target="Nile")
    said = tokenizer(" Blue Nile", add_special_tokens=False).input_ids
    prompt, answer = Unlearner._route_to(SimpleNamespace(encoder=enc), f, said)
    assert enc.decode(answer).strip() == "Nile"
    assert prompt == enc.prompt_ids(f.prompt, False) + said[:len(said) - len(answer)]
    assert enc.decode(prompt).endswith("is the Blue")
    assert Unlearner._route_to(SimpleNamespace(encoder=enc), f, None) is None


def test_recall_rounds_train_on_an_answer_that_comes_out_by_another_route(monkeypatch):
    """After the probability criterion is met, a target that greedy decoding still produces becomes a new
    negative in its own context and training continues on the same adapter."""
    from lune_fast.api import Unlearner

    u = Unlearner("default")
    records = [{"prompt": "The chemical symbol for gold is", "target": "Au"}]
    # in-context copying keeps the target likely after the first run has pushed it down at the prompt
    route = u.encoder.answer_ids(records[0]["prompt"], "Au. Once more: the chemical symbol for gold is Au", False)
    calls, trained, steps = [], [], []
    real_train = trainer.train

    def said(facts, max_new_tokens=24):  # the first check finds the target behind other words, the second nothing
        calls.append(len(facts))
        return [route] if len(calls) == 1 else [None]

    def spy(model, batches, *a, **k):
        trained.append(sum(b.n_seq for b in batches))
        outcome = real_train(model, batches, *a, **k)
        steps.append(outcome.steps)
        return outcome

    monkeypatch.setattr(u, "self_negatives", said)
    monkeypatch.setattr("lune_fast.api.train", spy)
    r = u.forget(records, progress=False, evaluate_before=False, evaluate_after=False, recall_rounds=3,
                 prompt_variants=0)  # one training pair per record
    assert calls == [1, 1]  # checked after the first run and after the continuation, then stopped
    assert trained == [1, 2]  # the continuation trains on the record plus its route
    assert r.outcome.recall_rounds == 1 and steps[1] >= 1 and r.cost["steps"] == sum(steps)
