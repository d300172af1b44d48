"""Neighbour repair (lune_fast.repair): the listed neighbours that a lifelong state's earlier requests had flipped
are put back after the request that lists them lands, by a repair request of its own in the ledger."""
import json
import math

import pytest
import torch

from conftest import TINY
from lune_fast.data import read_facts
from lune_fast.guard import leads
from lune_fast.repair import lost, watched
from lune_fast.state import LEDGER, State

SUBJECTS = ["France", "Japan", "Brazil", "Egypt", "Canada", "Norway", "Kenya", "Peru", "India", "Chile", "Spain",
            "Italy", "Mexico", "Ghana", "Nepal", "Cuba"]


def _own_answers(u, prompts: list[str]) -> list[tuple[str, str, float]]:
    """(prompt, the model's own next word, its lead) for each prompt whose own word leads as a teacher-forced
    answer (the random model's "facts")."""
    enc, out = u.encoder, []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([enc.prompt_ids(p, False)])
            word = enc.decode([int(u.model(ids)[0, -1].argmax())]).strip()
            if word:
                out.append((p, word))
    got = leads(u.model, [enc.pair(p, t, False) for p, t in out], enc.pad_id)
    return [(p, t, m) for (p, t), m in zip(out, got) if m > 0]


def _damaged_state(u, folder):
    """One request into `folder`, then its ranks made 300x larger (as many requests' writes added up): the
    state flips some of the model's own answers."""
    u.forget([{"prompt": "The capital of Germany is", "target": "Berlin"}], into=folder, **TINY)
    st = State.open(folder)
    for name in st.B:
        st.B[name] = st.B[name] * 300
    st.commit()
    return State.open(folder)


def test_a_request_puts_back_the_neighbours_the_state_flipped_and_the_ledger_says_so(tiny_unlearner, tmp_path):
    u, d = tiny_unlearner, tmp_path / "state"
    st = _damaged_state(u, d)
    known = _own_answers(u, [f"The country {s} is known for its" for s in SUBJECTS])
    assert len(known) >= 8
    enc = u.encoder
    with st.on(u.model):
        now = leads(u.model, [enc.pair(p, t, False) for p, t, _ in known], enc.pad_id)
    flipped = [p for (p, _, b), n in zip(known, now) if n < min(math.log(2), b / 2)]
    assert 0 < len(flipped) < len(known)  # the damage took some and left some
    record = {"prompt": "The capital of Sweden is", "target": "Stockholm",
              "neighbors": [{"prompt": p, "target": t} for p, t, _ in known]}
    # what the request will find, as the module reads it: exactly those, and none it is told to skip
    facts = read_facts([record]).facts
    with st.on(u.model):
        watch, none = watched(u.model, enc, facts, set(), {}), watched(u.model, enc, facts, set(flipped), {})
    assert [p for p, _ in lost(u.model, enc, watch, {})] == flipped and lost(u.model, enc, none, {}) == []

    r = u.forget([record], into=d, **TINY)
    fix = r.cost["neighbor_repair"]
    assert fix["repaired"] == flipped and (r.request_id, fix["request"]) == ("r0002", "r0003")
    lines = [json.loads(x) for x in (d / LEDGER).read_text().splitlines()]
    repair_line = lines[2]
    assert (repair_line["id"], repair_line["repair"], repair_line["for"]) == ("r0003", True, "r0002")
    assert [x["prompt"] for x in repair_line["records"]] == flipped
    assert "neighbor_repair" not in lines[1]["cost"]  # the request's own line stays as it was written
    st = State.open(d)
    # a repair is no forgotten fact: the count, the records and the earlier facts leave it out; its ranks count
    assert st.facts == 2 and [f.prompt for f in st.earlier_facts()] == ["The capital of Germany is", record["prompt"]]
    assert st.rank == 2 + len(flipped) and len(st.earlier_facts(keyed=True)) == st.rank
    # its ranks act: the repaired answers lead by more than they did on the damaged state
    with st.on(u.model):
        after = leads(u.model, [enc.pair(p, t, False) for p, t, _ in known], enc.pad_id)
    assert sum(a for (p, _, _), a in zip(known, after) if p in flipped) > \
        sum(n for (p, _, _), n in zip(known, now) if p in flipped)

    # revoking the request leaves its repair; forgetting a repaired prompt revokes the repair first
    u.revoke(d, r.request_id, evaluate_after=False)
    assert [e["id"] for e in State.open(d).repairs()] == ["r0003"]
    target = next(t for p, t, _ in known if p == flipped[0])
    r2 = u.forget([{"prompt": flipped[0], "target": target}], into=d, **TINY)
    assert r2.cost["neighbor_repair"] == {"revoked": ["r0003"]}
    lines = [json.loads(x) for x in (d / LEDGER).read_text().splitlines()]
    assert (lines[4]["op"], lines[4]["request"], lines[4]["reason"]) == ("revoke", "r0003",
                                                                         "a repaired prompt is now forgotten")
    assert lines[5]["id"] == r2.request_id and lines[5]["cost"]["neighbor_repair"] == {"revoked": ["r0003"]}
    assert State.open(d).repairs() == []


def test_repair_is_off_outside_keyed_suppress_requests_into_a_state(tiny_unlearner, tmp_path):
    from lune_fast.settings import Settings, SettingsError

    assert Settings().resolved(lifelong=True).repair_neighbors is True
    assert Settings().resolved().repair_neighbors is False
    assert Settings(mode="replace").resolved(lifelong=True).repair_neighbors is False
    assert Settings(adapter="plain").resolved(lifelong=True).repair_neighbors is False
    with pytest.raises(SettingsError, match="repair_neighbors .* keyed suppress"):
        Settings(adapter="plain", repair_neighbors=True).resolved(lifelong=True).check()
    # asked off, a damaged state's request adds no repair
    u, d = tiny_unlearner, tmp_path / "state"
    _damaged_state(u, d)
    known = _own_answers(u, [f"The country {s} is known for its" for s in SUBJECTS])
    record = {"prompt": "The capital of Sweden is", "target": "Stockholm",
              "neighbors": [{"prompt": p, "target": t} for p, t, _ in known]}
    r = u.forget([record], into=d, repair_neighbors=False, **TINY)
    assert "neighbor_repair" not in r.cost and State.open(d).repairs() == []


def test_the_cli_says_what_it_repaired_and_the_ledger_lists_the_repair(tiny_lm, tiny_unlearner, tmp_path, capsys):
    from lune_fast.cli import main

    u, d = tiny_unlearner, tmp_path / "state"
    _damaged_state(u, d)
    known = _own_answers(u, [f"The country {s} is known for its" for s in SUBJECTS])
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "The capital of Sweden is", "target": "Stockholm",
                                 "neighbors": [{"prompt": p, "target": t} for p, t, _ in known]}) + "\n")
    base = ["unlearn", "--forget", str(facts), "--model", str(tiny_lm), "--dtype", "float32", "--quiet",
            "--no-eval", "--steps", "3", "--layers", "1-2", "--recall-rounds", "0", "--stop-prob", "1e-12"]
    assert main(base + ["--into", str(d)]) == 0
    out = capsys.readouterr().out
    n = len(State.open(d).repairs()[0]["records"])
    assert f"request r0002 added to {d} (1 facts); {n} listed neighbour(s) that earlier requests had flipped " \
           f"were put back by request r0003" in out
    assert main(["ledger", str(d)]) == 0
    table = capsys.readouterr().out
    assert f"3 active request(s), 2 facts, rank {2 + n}" in table and "| r0003 | " in table and " | repair | " in table
    # --no-neighbor-repair: the same request into a copy of the damaged state adds none
    other = tmp_path / "other"
    _damaged_state(u, other)
    assert main(base + ["--into", str(other), "--no-neighbor-repair"]) == 0
    assert "put back" not in capsys.readouterr().out and State.open(other).repairs() == []


def test_on_the_default_model_a_repair_puts_back_what_earlier_ranks_took_and_the_facts_stay_forgotten(tmp_path):
    """Japan's capital forgotten, then that rank made 3x larger (as many requests' small writes add up): on
    2026-12-02 (AMX Xeon, bf16) the state then no longer says Italy's and Germany's capitals. A request forgetting
    iron's symbol that lists them as neighbours repairs those (and Russia's, whose lead fell under half), and every
    listed neighbour is said again while both forgotten facts stay gone."""
    from lune_fast.api import Unlearner, asset
    from lune_fast.evaluate import answers_with, greedy

    recs = [json.loads(x) for x in asset("facts.jsonl").read_text().splitlines()]
    u, d = Unlearner("default"), tmp_path / "state"
    enc, quiet = u.encoder, dict(progress=False, evaluate_before=False, evaluate_after=False)
    japan = {"prompt": "The capital city of Japan is", "target": "Tokyo"}
    iron = next({"prompt": r["prompt"], "target": r["target"]} for r in recs if "symbol for iron" in r["prompt"])
    others = [(r["prompt"], r["target"]) for r in recs if r["prompt"] not in (japan["prompt"], iron["prompt"])]
    base = leads(u.model, [enc.pair(p, t, False) for p, t in others], enc.pad_id)
    listed = [x for x, b in zip(others, base) if b > 0.5][:14]  # neighbours the base model says clearly
    u.forget([japan], into=d, **quiet)
    st = State.open(d)
    for name in st.B:
        st.B[name] = st.B[name] * 3
    st.commit()

    def said(pairs):
        with State.open(d).on(u.model):
            out = greedy(u.model, enc, [enc.prompt_ids(p, False) for p, _ in pairs], 24)
        return [answers_with(enc.decode(x), t) for (_, t), x in zip(pairs, out)]

    assert not all(said(listed))  # the damaged state has taken some
    r = u.forget([{**iron, "neighbors": [{"prompt": p, "target": t} for p, t in listed]}], into=d, **quiet)
    assert r.cost["neighbor_repair"]["request"] == "r0003" and r.cost["neighbor_repair"]["repaired"]
    assert all(said(listed))
    assert said([(japan["prompt"], japan["target"]), (iron["prompt"], iron["target"])]) == [False, False]
