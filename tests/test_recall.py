"""Recall rounds: a target that greedy decoding still produces after training becomes a new negative."""
import torch

from lune_fast import recall
from lune_fast.data import Encoder, Fact


def test_route_to_keeps_the_words_before_the_target_in_the_prompt(tokenizer):
    enc = Encoder(tokenizer)
    f = Fact(prompt="The longest river in Africa is the", target="Nile")
    said = tokenizer(" Blue Nile", add_special_tokens=False).input_ids
    prompt, answer = recall.route_to(enc, f, said)
    assert enc.decode(answer).strip() == "Nile"
    assert prompt == enc.prompt_ids(f.prompt, False) + said[:len(said) - len(answer)]
    assert enc.decode(prompt).endswith("is the Blue")
    assert recall.route_to(enc, f, None) is None


def test_recall_rounds_train_on_an_answer_that_comes_out_by_another_route(monkeypatch):
    """After the probability criterion is met, a target that greedy decoding still produces becomes a new
    negative in its own context and training continues on the same adapter."""
    from lune_fast import api
    from lune_fast.api import Unlearner

    u = Unlearner("default")
    records = [{"prompt": "The chemical symbol for gold is", "target": "Au"}]
    # in-context copying keeps the target likely after the first run has pushed it down at the prompt
    route = u.encoder.answer_ids(records[0]["prompt"], "Au. Once more: the chemical symbol for gold is Au", False)
    calls, trained, steps = [], [], []
    real_train = recall.train_keeping_last_good

    def said(model, enc, facts, max_new_tokens=24, dist=None):  # the first check finds the target, the second nothing
        calls.append(len(facts))
        return [route] if len(calls) == 1 else [None]

    def spy(model, data, *a, **k):
        trained.append(sum(b.n_seq for b in data.batches))
        outcome, error = real_train(model, data, *a, **k)
        steps.append(outcome.steps)
        return outcome, error

    monkeypatch.setattr(recall, "self_negatives", said)
    monkeypatch.setattr(recall, "train_keeping_last_good", spy)
    monkeypatch.setattr(api, "train_keeping_last_good", spy)
    r = u.forget(records, progress=False, evaluate_before=False, evaluate_after=False, recall_rounds=3,
                 prompt_variants=0)  # one training pair per record
    assert calls == [1, 1]  # checked after the first run and after the continuation, then stopped
    assert trained == [1, 2]  # the continuation trains on the record plus its route
    assert r.cost["recall_rounds"] == 1 and steps[1] >= 1 and r.cost["steps"] == sum(steps)
    assert torch.is_tensor(next(iter(r.adapter.values())))


def test_robust_to_checks_the_model_as_its_quantized_export_answers(monkeypatch, tiny_lm):
    """With robust_to the recall check runs inside lune_fast.export.quantized: the adapter folded in and the
    weights on the export's grid while it asks (an adapted matrix on q8_0's, as a 4-bit export keeps it); the
    weights are the trained ones again afterwards."""
    from lune_fast import lora
    from lune_fast.api import Unlearner
    from lune_fast.export import round_trip, tensor_type

    u = Unlearner(str(tiny_lm), dtype="float32")
    seen = []

    def said(model, enc, facts, max_new_tokens=24, dist=None):
        m = next(iter(lora.adapters_of(model).values()))
        w = m.base.weight
        seen.append((m.merged, torch.equal(w, round_trip(w, tensor_type("blk.0.ffn_down.weight", tuple(w.shape),
                                                                          "q4_1", edited=True)))))
        return [None] * len(facts)

    monkeypatch.setattr(recall, "self_negatives", said)
    records = [{"prompt": "The chemical symbol for gold is", "target": "Au"}]
    for robust in (None, "q4_1"):
        u.forget(records, progress=False, evaluate_before=False, evaluate_after=False, steps=2, layers="1-2",
                 robust_to=robust)
    assert seen == [(False, False), (True, True)]
