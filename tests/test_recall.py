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
        return [route] if len(calls) == 1 else [[]]

    def spy(model, data, *a, **k):
        trained.append(sum(b.n_seq for b in data.batches))
        outcome, error = real_train(model, data, *a, **k)
        steps.append(outcome.steps)
        return outcome, error

    monkeypatch.setattr(recall, "answers", said)
    monkeypatch.setattr(recall, "train_keeping_last_good", spy)
    monkeypatch.setattr(api, "train_keeping_last_good", spy)
    r = u.forget(records, progress=False, evaluate_before=False, evaluate_after=False, recall_rounds=3,
                 prompt_variants=0, check_dtypes="none")  # one training pair per record; asked in one dtype
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
        return [[] for _ in facts]

    monkeypatch.setattr(recall, "answers", said)
    records = [{"prompt": "The chemical symbol for gold is", "target": "Au"}]
    for robust in (None, "q4_1"):
        u.forget(records, progress=False, evaluate_before=False, evaluate_after=False, steps=2, layers="1-2",
                 robust_to=robust)
    assert seen == [(False, False), (True, True)]


def test_mirror_shares_the_adapter_with_the_model_in_another_dtype(tiny_lm):
    """lora.mirror puts on a float32 copy adapters made of the bf16 model's own A and B (no copy): its logits
    match the float32 copy with the adapter loaded from PEFT's files, before and after an update of B."""
    from lune_fast import lora
    from lune_fast.weights import load_model

    bf16 = load_model(tiny_lm, dtype=torch.bfloat16)
    f32, ref = load_model(tiny_lm, dtype=torch.float32, pack=False), load_model(tiny_lm, dtype=torch.float32)
    mods = lora.attach(bf16, lora.LoraSettings(rank=4, alpha=8.0, targets=("down",), layers=(1, 2)), seed=1)
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        with torch.no_grad():
            for m in mods.values():
                m.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(step))
        lora.mirror(bf16, f32)
        assert all(a.lora_B is mods[n].lora_B for n, a in lora.adapters_of(f32).items())
        lora.detach(ref)
        lora.attach_tensors(ref, bf16.lora_settings, lora.adapter_state(bf16), "test")
        with torch.no_grad():
            got, want = f32(ids), ref(ids)
        # the same float32 sums in another order: float32's rounding, far from the adapter's effect
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        with torch.no_grad():
            lora.detach(ref)
            base = ref(ids)
        assert (want - base).abs().max() > 1e-2 * base.abs().max()


def test_recall_rounds_ask_the_float32_model_after_a_bf16_run(monkeypatch, tiny_lm):
    """check_dtypes: once the training dtype says none of the answers, the recall rounds ask the model loaded in
    float32 (the adapter shared), and a route only float32 takes trains, below the threshold its bf16
    probability sets; report.json names both dtypes; "none" asks the training dtype only."""
    from lune_fast import lora
    from lune_fast.api import Unlearner

    u = Unlearner(str(tiny_lm), dtype="bfloat16")
    records = [{"prompt": "The chemical symbol for gold is", "target": "Au"}]
    route = u.encoder.answer_ids(records[0]["prompt"], "Au", False)
    asked, trained, stops = [], [], []

    def said(model, enc, facts, max_new_tokens=24, dist=None):  # float32 says it once, bf16 never
        dtype = next(model.parameters()).dtype
        shares = all(m.lora_B is n.lora_B for m, n in zip(lora.adapters_of(model).values(),
                                                          lora.adapters_of(u.model).values()))
        asked.append((dtype, shares))
        return [route if dtype == torch.float32 and len(asked) == 2 else [] for _ in facts]

    real_train = recall.train_keeping_last_good

    def spy(model, data, settings, run):
        trained.append(sum(b.n_seq for b in data.batches))
        stops.append(settings.stop_prob)
        return real_train(model, data, settings, run)

    monkeypatch.setattr(recall, "answers", said)
    monkeypatch.setattr(recall, "answers_alike", lambda twin, enc, facts, said: [False] * len(facts))
    monkeypatch.setattr(recall, "train_keeping_last_good", spy)
    # a random model gives the answer ~1/vocab: the first run stops at once, under the 0.01 threshold
    kw = dict(progress=False, evaluate_before=False, evaluate_after=False, steps=6, layers="1-2", recall_rounds=2,
              prompt_variants=0, stop_prob=0.01)
    r = u.forget(records, **kw)
    assert [d for d, _ in asked] == [torch.bfloat16, torch.float32] * (len(asked) // 2) and len(asked) >= 2
    assert all(s for _, s in asked)
    assert trained[0] == 2 and r.cost["recall_rounds"] >= 1  # the continuation: the record and the float32 route
    assert stops[0] < 0.01 * recall.ROUND_FACTOR ** 2  # the route's own bf16 probability sets it
    assert r.config["checked_in"] == ["bfloat16", "float32"]
    asked.clear()
    r = u.forget(records, check_dtypes="none", **kw)
    assert [d for d, _ in asked] == [torch.bfloat16] and r.config["checked_in"] == ["bfloat16"]



def test_answers_alike_tells_the_twins_own_greedy_answer_from_another(tiny_lm, tokenizer):
    """One teacher-forced forward says whether a model would answer greedily with given tokens: its own greedy
    answers are alike (batched with right padding, prompts of several lengths), one changed token is not."""
    from lune_fast.weights import load_model

    enc = Encoder(tokenizer)
    model = load_model(tiny_lm, dtype=torch.float32, pack=False)
    facts = [Fact(prompt=p, target="x") for p in ("The capital of France is", "A", "Water boils at a temperature of")]
    said = recall.answers(model, enc, facts, 8)
    assert all(len(g) >= 1 for g in said)
    assert recall.answers_alike(model, enc, facts, said, chunk=2) == [True, True, True]
    changed = [g[:-1] + [(g[-1] + 1) % 49152] for g in said]
    assert recall.answers_alike(model, enc, facts, [said[0], changed[1], said[2]]) == [True, False, True]
