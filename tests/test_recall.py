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


def _bf16_with_adapter(tiny_lm, scale: float, seed: int):
    from lune_fast import lora
    from lune_fast.weights import load_model

    bf16 = load_model(tiny_lm, dtype=torch.bfloat16)
    mods = lora.attach(bf16, lora.LoraSettings(rank=4, alpha=8.0, targets=("down", "q"), layers=(1, 2)), seed=1)
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(0, scale, generator=torch.Generator().manual_seed(seed))
    return bf16, mods


def _float32_reference(tiny_lm, bf16):
    """The model as transformers + PEFT load it: float32 from the files, the adapter from PEFT's tensors."""
    from lune_fast import lora
    from lune_fast.weights import load_model

    ref = load_model(tiny_lm, dtype=torch.float32, pack=False)
    lora.attach_tensors(ref, bf16.lora_settings, lora.adapter_state(bf16), "test")
    return ref


def test_streamed_twin_runs_the_float32_model_with_the_adapter_as_it_is_now(tiny_lm):
    """The streamed twin (one layer read at a time, the adapter folded in) gives the float32 model's hidden
    states with the adapter loaded from PEFT's tensors, within float32 rounding (the merged and the unmerged
    product sum in another order), and the same argmax; a change of B acts on the next pass, with no new twin."""
    from lune_fast import lora
    from lune_fast.twin import StreamedTwin
    from lune_fast.weights import safetensors_files

    bf16, mods = _bf16_with_adapter(tiny_lm, 0.5, 0)
    twin = StreamedTwin(safetensors_files(tiny_lm), torch.float32, bf16)
    ids = torch.randint(0, 49152, (3, 11), generator=torch.Generator().manual_seed(0))
    pick = torch.rand(3, 11, generator=torch.Generator().manual_seed(1)) < 0.6
    for step in range(2):
        if step:
            with torch.no_grad():
                for m in mods.values():
                    m.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
        ref = _float32_reference(tiny_lm, bf16)
        with torch.no_grad():
            want = ref(ids, return_hidden=True, select=pick)
            want_logits = ref(ids, select=pick)
        got = twin.hidden(ids, pick)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert torch.equal(twin.head_argmax(want), want_logits.argmax(-1))
        lora.detach(ref)
        with torch.no_grad():
            base = ref(ids, return_hidden=True, select=pick)
        assert (want - base).abs().max() > 1e-2 * base.abs().max()  # the adapter's effect is far above the bound


def test_recall_rounds_ask_the_float32_model_after_a_bf16_run(monkeypatch, tiny_lm):
    """check_dtypes: once the training dtype says none of the answers, the recall rounds ask the model loaded in
    float32 (read from its files, the adapter as it is), and a route only float32 takes trains, below the threshold its bf16
    probability sets; report.json names both dtypes; "none" asks the training dtype only."""
    from lune_fast import lora
    from lune_fast.api import Unlearner

    u = Unlearner(str(tiny_lm), dtype="bfloat16")
    records = [{"prompt": "The chemical symbol for gold is", "target": "Au"}]
    route = u.encoder.answer_ids(records[0]["prompt"], "Au", False)
    asked, trained, stops = [], [], []

    def said(model, enc, facts, max_new_tokens=24, dist=None):  # bf16 never says it
        asked.append((next(model.parameters()).dtype, model is u.model))
        return [[] for _ in facts]

    def twin_said(twin, model, enc, facts, said, max_new_tokens=24):  # float32 says it once
        asked.append((twin.dtype, twin.source is u.model and model is u.model))
        return [route if len(asked) == 2 else g for g in said]

    real_train = recall.train_keeping_last_good

    def spy(model, data, settings, run):
        trained.append(sum(b.n_seq for b in data.batches))
        stops.append(settings.stop_prob)
        return real_train(model, data, settings, run)

    monkeypatch.setattr(recall, "answers", said)
    monkeypatch.setattr(recall, "twin_answers", twin_said)
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



def test_twin_answers_are_the_float32_models_own_greedy_answers(tiny_lm, tokenizer):
    """The twin corrects drafts into its own greedy answers (first line, as `answers` decodes): from the bf16
    model's answers, and from drafts wrong from their first, middle or last token, the result is what the
    float32 model with the adapter decodes itself, token for token (prompts of several lengths, batched)."""
    from lune_fast.twin import StreamedTwin
    from lune_fast.weights import safetensors_files

    enc = Encoder(tokenizer)
    bf16, _ = _bf16_with_adapter(tiny_lm, 0.5, 3)
    twin = StreamedTwin(safetensors_files(tiny_lm), torch.float32, bf16)
    facts = [Fact(prompt=p, target="x") for p in ("The capital of France is", "A", "Water boils at a temperature of",
                                                   "Q: Who wrote Hamlet?\nA:")]
    want = recall.answers(_float32_reference(tiny_lm, bf16), enc, facts, 8)
    drafts = recall.answers(bf16, enc, facts, 8)
    assert recall.twin_answers(twin, bf16, enc, facts, drafts, 8) == want
    assert all(len(g) >= 2 for g in want[:3])
    a, b, c = want[:3]
    wrong = [[(a[0] + 1) % 49152] + a[1:], b[:len(b) // 2] + [(b[len(b) // 2] + 5) % 49152], c[:-1] + [13], []]
    assert recall.twin_answers(twin, bf16, enc, facts, wrong, 8) == want
