"""The neighbour guard: what counts as reproduced, and a run that must also put its retain pairs back."""
from lune_fast import lora
from lune_fast.data import make_batch
from lune_fast.generate import generate
from lune_fast.guard import leads
from lune_fast.trainer import RunOptions, TrainData, TrainSettings, train
from lune_fast.weights import load_model

PROMPTS = [[3, 17, 42], [5, 6, 7, 8], [90, 91]]


def test_a_lead_is_positive_exactly_where_greedy_says_the_answer(tiny_llama):
    model = load_model(tiny_llama)
    own = generate(model, PROMPTS, 3, eos_token_id=[])  # greedy: each token the most likely one
    assert all(len(o) == 3 for o in own)
    pairs = list(zip(PROMPTS, own))
    got = leads(model, pairs, pad_id=0)
    # the smallest gap between each chosen token and the runner-up, from the logits directly
    b = make_batch(pairs)
    h = model(b.input_ids, return_hidden=True, select=b.sel)
    top = (h @ model.head_weight.t()).float().topk(2, -1).values
    want = [float((top[:, 0] - top[:, 1])[b.seq == i].min()) for i in range(3)]
    assert all(g > 0 for g in got) and max(abs(g - w) for g, w in zip(got, want)) < 1e-5
    # one token off, at the first, middle or last place: some other token leads
    off = [[t if j != k else (t + 1) % 211 for j, t in enumerate(o)] for k, o in enumerate(own)]
    assert all(g < 0 for g in leads(model, list(zip(PROMPTS, off)), pad_id=0))
    assert leads(model, [], pad_id=0) == []


def _run(tiny_llama, retain_keep: tuple):
    """A forget pair already past the criterion (stop_prob 1) and a retain answer the model does not give."""
    model = load_model(tiny_llama)
    own = generate(model, PROMPTS[1:2], 2, eos_token_id=[])[0]
    retain = (PROMPTS[1], [(t + 5) % 211 for t in own])
    assert leads(model, [retain], pad_id=0)[0] < 0
    lora.attach(model, lora.LoraSettings(rank=4, alpha=8, targets=("gate", "up", "down"), layers=(1, 2)), seed=0)
    settings = TrainSettings(objective="ga", lr=5e-2, steps=80, stop_prob=1.0, retain_weight=5.0,
                             retain_keep=retain_keep)
    data = TrainData([make_batch([(PROMPTS[0], [100, 7])])], retain=make_batch([retain]))
    out = train(model, data, settings, RunOptions(progress=False))
    return model, retain, out


def test_a_run_that_must_keep_its_retain_pairs_trains_until_they_lead(tiny_llama):
    model, retain, out = _run(tiny_llama, retain_keep=(0.5,))
    assert out.stopped == "criterion" and 0 < out.steps < 80
    assert leads(model, [retain], pad_id=0)[0] >= 0.5
    assert max(out.final_mean_prob) < 1.0  # the forget criterion still held when it stopped


def test_without_it_the_met_criterion_stops_at_once(tiny_llama):
    model, retain, out = _run(tiny_llama, retain_keep=())
    assert out.stopped == "criterion" and out.steps == 0
    assert leads(model, [retain], pad_id=0)[0] < 0


def test_a_guard_round_that_cannot_keep_both_is_undone_and_reported(tiny_lm, monkeypatch):
    """Through Unlearner.forget: the neighbour counts as answered before and flipped after (stubbed: a random
    model answers nothing), the round gets one step, cannot put it back, and is undone — the adapter is the
    one the guard-off run returns — while the report names the neighbour."""
    import torch

    from lune_fast import guard
    from lune_fast.api import Unlearner

    calls = []

    def stub(model, pairs, pad_id):
        calls.append(len(pairs))
        return [1.0 if len(calls) == 1 else -1.0] * len(pairs)  # answered by the base model, flipped later

    monkeypatch.setattr(guard, "leads", stub)
    monkeypatch.setattr(guard, "GUARD_STEPS", 1)
    neighbour = "A group of cows is called a"
    records = [{"prompt": "A baby cow is called a", "target": "calf",
                "neighbors": [{"prompt": neighbour, "target": "herd"}]}]
    u = Unlearner(str(tiny_lm), dtype="float32")
    run = dict(progress=False, evaluate_before=False, evaluate_after=False, steps=10, layers="1-2",
               stop_prob=0.99, recall_rounds=0)
    plain = u.forget(records, **run)
    guarded = u.forget(records, neighbor_guard=True, **run)
    assert guarded.cost["neighbor_guard"] == {"guarded": 1, "flipped": [neighbour], "still_flipped": [neighbour],
                                              "reverted": True}
    assert guarded.cost["steps"] == plain.cost["steps"] + 1  # the round's step ran, and was undone
    assert guarded.adapter.keys() == plain.adapter.keys()
    assert all(torch.equal(guarded.adapter[k], plain.adapter[k]) for k in plain.adapter)
    assert "neighbor_guard" not in plain.cost


def test_the_guard_watches_earlier_facts_neighbours_and_never_a_forget_prompt(tiny_llama, monkeypatch):
    """Guard.of lists the request's and a state's earlier facts' neighbours, once each, and leaves out any that
    is a forget prompt of either (a request may list another of its facts as a neighbour: keeping it would fight
    the forgetting)."""
    import lune_fast.guard as guard_mod
    from lune_fast.data import Fact

    class Enc:
        pad_id = 0

        def pair(self, prompt, answer, chat):
            return [len(prompt) % 200 + 1], [len(answer) % 200 + 1]

    monkeypatch.setattr(guard_mod, "leads", lambda model, pairs, pad_id: [1.0] * len(pairs))
    new = [Fact("A is", "a", neighbors=[("B is", "b"), ("N1 is", "n1")]), Fact("B is", "b", neighbors=[("N1 is", "n1")])]
    old = [Fact("C is", "c", neighbors=[("N2 is", "n2"), ("A is", "a")])]
    g = guard_mod.Guard.of(None, Enc(), new, old)
    assert g.prompts == ["N1 is", "N2 is"]
    assert g.need == [0.5, 0.5]  # half the lead of 1.0, under ln 2


def test_in_a_state_the_subjects_guard_watches_the_earlier_neighbours_about_the_requests_subjects(tokenizer, monkeypatch):
    """scope "subjects": of the earlier facts' listed neighbours only those about a subject of the request (the
    prompts its new ranks read) are guarded, with the request's own; "all" watches every earlier one; an earlier
    fact's prompt is never guarded, whatever the scope."""
    import lune_fast.guard as guard_mod
    from lune_fast.data import Encoder, Fact

    monkeypatch.setattr(guard_mod, "leads", lambda model, pairs, pad_id: [1.0] * len(pairs))
    enc = Encoder(tokenizer)
    new = [Fact("The capital of Japan is", "Tokyo", neighbors=[("The capital of Ireland is", "Dublin")])]
    old = [Fact("The currency of France is the", "euro",
                neighbors=[("The currency of Japan is the", "yen"), ("The currency of Mexico is the", "peso")]),
           Fact("The main language spoken in Peru is", "Spanish",
                neighbors=[("The main language spoken in Japan is", "Japanese"),
                           ("The currency of France is the", "euro")])]
    subjects = guard_mod.Guard.of(None, enc, new, old, "subjects")
    assert subjects.prompts == ["The capital of Ireland is", "The currency of Japan is the",
                                "The main language spoken in Japan is"]
    every = guard_mod.Guard.of(None, enc, new, old, "all")
    assert every.prompts == ["The capital of Ireland is", "The currency of Japan is the",
                             "The currency of Mexico is the", "The main language spoken in Japan is"]


def test_neighbor_guard_takes_a_scope_and_the_old_booleans():
    import pytest

    from lune_fast.settings import Settings, SettingsError

    assert Settings().resolved().neighbor_guard == "off"
    assert Settings().resolved(lifelong=True).neighbor_guard == "subjects"
    assert Settings(neighbor_guard=True).resolved().neighbor_guard == "all"
    assert Settings(neighbor_guard=False).resolved().neighbor_guard == "off"
    assert Settings(neighbor_guard="subjects").resolved().neighbor_guard == "subjects"
    with pytest.raises(SettingsError, match="neighbor_guard must be one of off, subjects, all, got 'some'"):
        Settings(neighbor_guard="some").resolved().check()
    with pytest.raises(SettingsError, match="neighbor_guard must be one of"):
        Settings(neighbor_guard=["all"]).resolved().check()  # as a JSON --settings could give it


def test_the_cli_names_the_guards_scope():
    from lune_fast.cli import build_parser

    def scope(*flags):
        return build_parser().parse_args(["unlearn", "--forget", "f.jsonl", "--out", "o", *flags]).neighbor_guard

    assert scope() is None and scope("--neighbor-guard") == "all"  # None: the default for where it goes
    assert scope("--neighbor-guard", "subjects") == "subjects" and scope("--no-neighbor-guard") == "off"
