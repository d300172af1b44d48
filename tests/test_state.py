"""Lifelong states (lune_fast.state): requests composed into one PEFT adapter, the ledger, revocation, atomic
updates under kills, and an Unlearner shared between threads."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, rel_err
from lune_fast import lifelong, lora
from lune_fast.state import ADAPTER, LEDGER, State, StateError, file_sha256, locked

RECORDS_1 = [{"prompt": "The capital of France is", "target": "Paris"},
             {"prompt": "The author of Hamlet is", "target": "William Shakespeare"}]
RECORDS_2 = [{"prompt": "The largest planet is", "target": "Jupiter"},
             {"prompt": "The chemical symbol for gold is", "target": "Au"},
             {"prompt": "The inventor of the telephone was", "target": "Alexander Graham Bell"}]
# the default-model tests measure forgetting: their records without paraphrases and neighbours, and one line of
# retain text, keep the evaluations to the forget prompts (a few seconds instead of minutes on 2 cores)
RETAIN = ["The river ran past the old mill, and the children walked along its bank to school every morning."]


def _bare(path: Path) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "target")} for r in map(json.loads, path.read_text().splitlines())]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / ADAPTER))


def _peft_matches(u, d: Path, monkeypatch) -> torch.Tensor:
    """PEFT loads the state folder `d` as it is and gives our logits with the state on (float32 bound);
    returns the token ids compared."""
    import huggingface_hub
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(d)).eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    lora.load_adapter(u.model, d)
    with torch.no_grad():
        got, ref = u.model(ids), peft_model(ids).logits
    lora.detach(u.model)
    assert rel_err(got, ref) <= 1e-5
    return ids


def test_requests_compose_into_one_peft_adapter_and_revoke_removes_exactly_their_ranks(tiny_unlearner, tmp_path,
                                                                                     monkeypatch):
    u, d = tiny_unlearner, tmp_path / "state"
    r1 = u.forget(RECORDS_1, into=d, **TINY)
    after_1 = _tensors(d)
    r2 = u.forget(RECORDS_2, into=d, **TINY)
    assert (r1.request_id, r2.request_id) == ("r0001", "r0002")
    assert not lora.adapters_of(u.model)  # the model is left clean

    # one plain adapter of rank 2 + 3 whose first ranks are request 1's, unchanged by request 2
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5.0
    both = _tensors(d)
    for k, t in after_1.items():
        part = both[k][:2] if ".lora_A." in k else both[k][:, :2]
        assert torch.equal(part, t)
        assert rel_err(both[k][2:] if ".lora_A." in k else both[k][:, 2:],
                       r2.adapter[k] * (1 if ".lora_A." in k else r2.adapter_config["lora_alpha"] /
                                        r2.adapter_config["r"])) == 0

    # the new ranks do not read the earlier subjects: |A_2 k_1| is small next to A_2 k_2 (≈ I)
    st = State.open(d)
    for name, a in st.A.items():
        k1, k2 = st.keys["r0001"][name], st.keys["r0002"][name]
        own = (a[2:] @ k2.t()).diagonal()
        cross = (a[2:] @ k1.t()).abs().max()
        assert own.min() > 0.9 and cross < 0.02 * own.min(), (name, own, cross)

    # the ledger: one line per request with what the contract names, and the last adapter's hash
    lines = [json.loads(x) for x in (d / LEDGER).read_text().splitlines()]
    assert [e["id"] for e in lines] == ["r0001", "r0002"]
    for e in lines:
        assert {"id", "time", "records", "settings", "before", "after", "adapter_sha256", "rank"} <= set(e)
    assert lines[0]["records"][1] == RECORDS_1[1] and lines[1]["rank"] == 3
    # a request into a state guards the neighbours about its subjects unless told otherwise (one alone: off)
    assert [e["settings"]["neighbor_guard"] for e in lines] == ["subjects"] * 2 and "neighbor_guard" in r2.cost
    assert lines[-1]["adapter_sha256"] == file_sha256(d / ADAPTER)

    # PEFT loads the state folder as it is, and gives our logits with the state on
    ids = _peft_matches(u, d, monkeypatch)

    # revoking request 1 leaves exactly request 2's ranks; revoking request 2 then leaves the model as it was
    u.revoke(d, "r0001", evaluate_after=False)
    only_2 = _tensors(d)
    for k, t in only_2.items():
        assert torch.equal(t, both[k][2:] if ".lora_A." in k else both[k][:, 2:])
    with pytest.raises(StateError, match="r0001.*revoked already"):
        u.revoke(d, "r0001", evaluate_after=False)
    with pytest.raises(StateError, match=r"no request 'r0042' \(requests: r0001, r0002\)"):
        u.revoke(d, "r0042", evaluate_after=False)
    line = u.revoke(d, "r0002", evaluate_after=False)
    assert line["id"] == "r0004" and line["request"] == "r0002"
    lora.load_adapter(u.model, d)  # an empty state is a zero adapter: the base model
    with torch.no_grad():
        empty = u.model(ids)
    lora.detach(u.model)
    with torch.no_grad():
        assert torch.equal(empty, u.model(ids))
    assert State.open(d).rank == 0 and [e["op"] for e in State.open(d).entries] == ["forget"] * 2 + ["revoke"] * 2


def test_a_subject_asked_about_again_shares_a_rank_or_gets_one_that_reads_it(tiny_unlearner, tmp_path,
                                                                               monkeypatch):
    """Within a request, facts about one subject share a rank (the later fact's row of A is zero); across
    requests, the new rank about an earlier request's subject reads that subject (it is not also held to zero
    on the earlier key of the same subject) and stays off the other earlier subjects; and it trains with the
    earlier rank of that subject left off (the others act)."""
    u, d = tiny_unlearner, tmp_path / "state"
    u.forget(RECORDS_1, into=d, **TINY)  # subjects France, Hamlet
    first = State.open(d)
    again = [{"prompt": "The main language spoken in France is", "target": "French"},
             {"prompt": "The chemical symbol for gold is", "target": "Au"},
             {"prompt": "The currency of France is the", "target": "euro"}]
    acting = {}
    real = lora.LoRALinear.set_earlier
    monkeypatch.setattr(lora.LoRALinear, "set_earlier",
                        lambda m, A, B: acting.setdefault(id(m), A.clone()) is None or real(m, A, B))
    u.forget(again, into=d, **TINY)
    monkeypatch.undo()
    assert len(acting) == len(first.A)
    for a in acting.values():  # request 1's Hamlet row only
        assert a.shape[0] == 1 and any(torch.equal(a[0], A[1]) for A in first.A.values())
    st = State.open(d)
    for name, a in st.A.items():
        new, k1, k2 = a[2:], st.keys["r0001"][name], st.keys["r0002"][name]
        assert torch.equal(k2[0], k2[2]) and float(new[2].abs().max()) == 0, name
        own = (new[[0, 1]] @ k2[[0, 1]].t()).diagonal()
        assert own.min() > 0.9, (name, own)
        assert float(new[0] @ k1[0]) > 0.5, name  # France, as request 1 read it
        assert float((new[[0, 1]] @ k1[1]).abs().max()) < 0.02 * float(own.min()), name  # Hamlet


def test_a_state_refuses_other_folders_layouts_and_hand_edits(tiny_unlearner, tmp_path):
    u = tiny_unlearner
    plain = tmp_path / "plain"
    u.forget(RECORDS_1, **TINY).save(plain)
    with pytest.raises(StateError, match=r"plain exists and is not a lune_fast state \(no ledger.jsonl\)"):
        u.forget(RECORDS_2, into=plain, **TINY)
    d = tmp_path / "state"
    u.forget(RECORDS_1, into=d, **TINY)
    with pytest.raises(StateError, match=r"adapts down at layers \[1, 2\]; this request resolved to down at \[0, 1\]"):
        u.forget(RECORDS_2, into=d, **{**TINY, "layers": "0-1"})
    ledger_before = (d / LEDGER).read_text()
    (d / ADAPTER).write_bytes((d / ADAPTER).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StateError, match="sha256 differs"):
        u.forget(RECORDS_2, into=d, **TINY)
    assert (d / LEDGER).read_text() == ledger_before  # a refused request wrote nothing


def test_the_cli_adds_lists_and_revokes(tiny_lm, tmp_path, capsys):
    from lune_fast.cli import main

    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS_1))
    d = tmp_path / "state"
    args = ["unlearn", "--forget", str(facts), "--into", str(d), "--model", str(tiny_lm), "--dtype", "float32",
            "--quiet", "--no-eval", "--steps", "2", "--layers", "1-2", "--recall-rounds", "0", "--stop-prob", "1e-12"]
    assert main(args) == 0 and main(args) == 0
    out = capsys.readouterr().out
    assert "request r0001 added to" in out and "request r0002 added to" in out
    assert main(["ledger", str(d)]) == 0
    table = capsys.readouterr().out
    assert "2 active request(s), 4 facts, rank 4" in table and "| r0002 | " in table and "| 2 | 1-2 |" in table
    assert main(["revoke", "--into", str(d), "--request", "r0001", "--no-eval", "--model", str(tiny_lm)]) == 0
    assert main(["ledger", str(d)]) == 0
    table = capsys.readouterr().out
    assert "| r0001 (revoked) |" in table and "revoke r0001" in table and "rank 2" in table
    assert main(["ledger", str(tmp_path / "nothing")]) == 2
    assert "no such state folder" in capsys.readouterr().err


def test_a_stream_resumes_the_state_it_finds_and_refuses_one_built_from_other_records(tiny_unlearner, tmp_path,
                                                                                      capsys):
    """bench stream --state: a state whose last request was revoked is measured first (a row without a time)
    and the stream goes on after its facts; one revoked in the middle, after the last held record; a state whose
    facts are not among the records in their order is refused by name, as are earlier results under --out."""
    from lune_fast.bench.stream import main as stream_main, run

    u, d = tiny_unlearner, tmp_path / "state"
    records = RECORDS_1 + RECORDS_2
    over = {k: v for k, v in TINY.items() if k not in ("progress", "evaluate_before", "evaluate_after")}
    rows, seconds = run(u, records, 2, 2, 1, d, overrides=over)
    assert [r["facts"] for r in rows] == [2, 4] and len(seconds) == 2 and rows[0]["request_s"] is not None
    assert all(r["returned"] == len(r["returned_prompts"]) for r in rows)  # the count and which facts
    u.revoke(d, "r0002", evaluate_after=False)
    rows, seconds = run(u, records, 2, 5, 1, d, overrides=over)  # only one record is left after the next two
    assert (rows[0]["requests"], rows[0]["facts"], rows[0]["request_s"]) == (1, 2, None)
    assert [(r["requests"], r["facts"]) for r in rows[1:]] == [(2, 4), (3, 5)] and len(seconds) == 2
    assert [f.prompt for f in State.open(d).earlier_facts()] == [r["prompt"] for r in records]
    with pytest.raises(StateError, match=r"its fact 2, 'The author of Hamlet is' -> 'William Shakespeare', is not "
                                         r"among the stream's records from record 6 on \(the stream has 5 records\)"):
        run(u, records[::-1], 1, 1, 1, d, overrides=over)
    # a request revoked in the middle: its records are passed over, the stream goes on after the last held one
    u.revoke(d, "r0004", evaluate_after=False)  # Jupiter, Au (r0003 is the first revoke)
    more = records + [{"prompt": "The tallest mountain is", "target": "Everest"}]
    rows, seconds = run(u, more, 1, 3, 1, d, overrides=over)
    assert [(r["requests"], r["facts"]) for r in rows] == [(2, 3), (3, 4)] and len(seconds) == 1
    assert [f.target for f in State.open(d).earlier_facts()] == ["Paris", "William Shakespeare",
                                                                "Alexander Graham Bell", "Everest"]
    # the command refuses it before loading a model (there is none at this path)
    facts = tmp_path / "other.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in records[2:]))
    no_model = ["--model", str(tmp_path / "no_model")]
    assert stream_main(["--facts", str(facts), "--state", str(d)] + no_model) == 2
    assert "its fact 1, 'The capital of France is' -> 'Paris', is not among the stream's records from record 1 " \
           "on (record 1 is 'The largest planet is' -> 'Jupiter')" in capsys.readouterr().err
    # and earlier results under --out, unless --overwrite
    (tmp_path / "s.jsonl").write_text("{}\n")
    assert stream_main(["--facts", str(facts), "--out", str(tmp_path / "s")] + no_model) == 2
    assert "s.jsonl already exist(s); pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "s.jsonl").read_text() == "{}\n"


# -- atomic updates -------------------------------------------------------------------------------------------
WRITER = r"""
import sys, torch
from lune_fast.state import State, locked, now
folder, start = sys.argv[1], int(sys.argv[2])
cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "m", "r": 2, "lora_alpha": 2.0,
       "target_modules": ["down_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}
name = "base_model.model.model.layers.0.mlp.down_proj"
for i in range(start, start + 10**6):
    with locked(folder):
        st = State.open(folder)
        g = torch.Generator().manual_seed(i)
        ad = {name + ".lora_A.weight": torch.randn(2, 256, generator=g), name + ".lora_B.weight": torch.randn(128, 2, generator=g)}
        entry = {"id": st.next_id(), "op": "forget", "time": now(), "records": [{"prompt": str(i), "target": "x"}],
                 "settings": {"targets": ["down"], "layers": [0]}, "rank": 2}
        st.with_request(entry, ad, cfg, {"layers.0.mlp.down_proj": torch.randn(1, 256, generator=g)}).commit()
    print(i, flush=True)
"""


def _consistent(folder: Path) -> int:
    """Open the state the way a request would and check that the folder is one whole state; its request count."""
    with locked(folder):
        st = State.open(folder)  # raises if the ledger and the adapter disagree
    assert st.rank == 2 * len(st.active()) == 2 * len(st.entries)
    assert set(st.keys) == {e["id"] for e in st.entries}
    assert all(a.shape[0] == st.rank for a in st.A.values())
    return len(st.entries)


def test_a_kill_at_any_moment_leaves_the_old_state_or_the_new(tmp_path):
    """SIGKILL a process that updates a state as fast as it can, at 12 moments, and open the state each time."""
    d = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = 0
    for k in range(12):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(1000 * k)], stdout=subprocess.PIPE, env=env,
                             text=True)
        assert p.stdout.readline()  # at least one update done: the kill falls inside a later one
        time.sleep(0.013 * k)
        p.send_signal(signal.SIGKILL)
        p.wait()
        n = _consistent(d)
        assert n >= seen + 1  # nothing finished is lost
        seen = n
    assert not list(tmp_path.glob(".state.tmp-*")) and not list(tmp_path.glob(".state.old-*"))


def test_an_interrupted_swap_is_put_back(tmp_path, monkeypatch):
    """A failure at each rename of the swap (the moments a kill can split) leaves a whole state."""
    import lune_fast.io as io_mod

    d = tmp_path / "state"
    env_code = WRITER.replace("for i in range(start, start + 10**6):", "for i in range(start, start + 1):")
    subprocess.run([sys.executable, "-c", env_code, str(d), "0"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    real = os.replace
    for fail_at in (0, 1):
        calls = []

        def replace(a, b):
            calls.append(a)
            if len(calls) - 1 == fail_at:
                raise KeyboardInterrupt  # stands for the kill: nothing after it runs
            return real(a, b)

        monkeypatch.setattr(io_mod.os, "replace", replace)
        st = State.open(d)
        st.entries[-1] = dict(st.entries[-1])
        with pytest.raises(KeyboardInterrupt):
            st.without_request(st.entries[0]["id"], {"id": "x", "op": "revoke", "request": st.entries[0]["id"],
                                                     "time": "t", "rank": 2}).commit()
        monkeypatch.setattr(io_mod.os, "replace", real)
        if fail_at == 1:  # killed between the renames: the folder is gone until the next open puts it back
            assert not d.exists()
        assert _consistent(d) == 1


# -- an Unlearner shared between threads ----------------------------------------------------------------
def test_calls_from_two_threads_take_turns_and_give_what_one_thread_gives(tiny_unlearner, tmp_path):
    u = tiny_unlearner
    solo = [u.forget(r, **TINY).adapter for r in (RECORDS_1, RECORDS_2)]
    spans, real = [], u._forget

    def timed(*args):
        t0 = time.perf_counter()
        try:
            return real(*args)
        finally:
            spans.append((t0, time.perf_counter()))

    u._forget = timed
    results = [None, None]

    def run(i, recs):
        results[i] = u.forget(recs, **TINY).adapter

    try:
        threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate((RECORDS_1, RECORDS_2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del u._forget
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # one call ran after the other
    for got, want in zip(results, solo):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_fact_records_in_the_ledger_read_back_to_the_same_facts():
    from lune_fast.data import read_facts
    from lune_fast.state import fact_record

    records = [{"prompt": "The Eiffel Tower is in", "target": "Paris", "subject": "The Eiffel Tower",
                "paraphrases": ["Where is the Eiffel Tower? It is in", {"prompt": "That iron tower is in",
                                                                       "names_subject": False}],
                "neighbors": [{"prompt": "The Colosseum is in", "target": "Rome"}], "replacement": "Lyon"},
               {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "paraphrased_question": "Hamlet's author?",
                "perturbed_answer": ["Marlowe"]}]
    facts = read_facts(records).facts
    again = read_facts([fact_record(f) for f in facts]).facts
    for f, g in zip(facts, again):
        f.source = g.source = ""
        assert f == g


def test_on_the_default_model_a_revoked_request_comes_back_and_the_others_stay_forgotten(tmp_path):
    """Two requests of four known facts into one state, then the first revoked (measured: both forgotten
    (0/8), after the revoke the first request's facts answer again 4/4 and the second's stay gone 0/4)."""
    from lune_fast.api import Unlearner, asset

    records = _bare(asset("facts.jsonl"))
    first, second = records[::12][:4], records[5::12][:4]
    u, d = Unlearner("default"), tmp_path / "state"
    u.forget(first, into=d, progress=False, evaluate_before=False, evaluate_after=False)
    r2 = u.forget(second, into=d, progress=False, evaluate_before=False, retain_texts=RETAIN)
    assert r2.after["forget_recall"] <= 0.25
    both = lifelong.state_metrics(u, State.open(d), first + second, RETAIN, False)
    assert both["forget_recall"] <= 0.25  # the first request's facts stayed forgotten through the second
    line = u.revoke(d, "r0001", retain_texts=RETAIN)
    assert line["after"]["revoked"]["forget_recall"] >= 0.75
    assert line["after"]["remaining"]["forget_recall"] <= 0.25
    assert json.loads((d / LEDGER).read_text().splitlines()[-1])["after"] == line["after"]


def test_on_the_default_model_revoking_a_request_gives_the_state_without_it_when_a_later_one_shares_subjects(
        tmp_path):
    """Request 1 forgets Japan's and Italy's capitals, request 2 their languages and Japan's currency: request 2's
    ranks read the same subjects. After revoking request 1 its facts answer as they do with request 2 alone on a
    fresh state, and request 2's stay gone. Measured on 2 threads: both capitals back, as with request 2 alone;
    when request 2 trained beside request 1's ranks, Italy's stayed gone (0.5 against 1.0). On 1 thread request 2
    alone already costs Tokyo (bf16 sums in another order), and the revoked state agrees with that too."""
    from lune_fast.api import Unlearner, asset

    records = {r["prompt"]: r for r in _bare(asset("facts.jsonl"))}
    first = [records["The capital city of Japan is"], records["The capital city of Italy is"]]
    second = [records[p] for p in ("The official language of Japan is", "The currency of Japan is the",
                                   "The official language of Italy is")]
    u, d, alone = Unlearner("default"), tmp_path / "state", tmp_path / "alone"
    quiet = dict(progress=False, evaluate_before=False, evaluate_after=False)
    u.forget(first, into=d, **quiet)
    u.forget(second, into=d, **quiet)
    assert lifelong.state_metrics(u, State.open(d), first + second, RETAIN, False)["forget_recall"] == 0
    line = u.revoke(d, "r0001", retain_texts=RETAIN)
    u.forget(second, into=alone, **quiet)
    without = lifelong.state_metrics(u, State.open(alone), first, RETAIN, False)
    assert line["after"]["revoked"]["forget_recall"] == without["forget_recall"] >= 0.5
    assert line["after"]["remaining"]["forget_recall"] == 0


def test_a_full_window_sends_requests_up_the_depth_and_peft_loads_the_mixed_ranks(tmp_path_factory, default_dir,
                                                                                  tmp_path, monkeypatch):
    """intermediate_size 8: a down_proj has room for 4 keyed facts; layers 1-2 are the first window, 3-4 the
    next, and 5-6 would not fit in 6 layers."""
    from conftest import make_tiny_lm
    from lune_fast.api import Unlearner

    folder = make_tiny_lm("llama", tmp_path_factory.mktemp("narrow_lm"), default_dir, num_hidden_layers=6,
                          intermediate_size=8, tie_word_embeddings=True)
    u = Unlearner(str(folder), dtype="float32")
    weights = {n: m.weight.detach().clone() for n, m in u.model.named_modules() if hasattr(m, "weight")}
    d = tmp_path / "state"
    r1 = u.forget(RECORDS_2, into=d, **TINY)  # 3 facts: layers 1-2
    r2 = u.forget(RECORDS_2[:1] + RECORDS_1, into=d, **TINY)  # 3 more: 1-2 would hold 6, so 3-4
    r3 = u.forget(RECORDS_1[:1], into=d, **TINY)  # 1 more: fits in 1-2
    assert [r.config["layers"] for r in (r1, r2, r3)] == [[1, 2], [3, 4], [1, 2]]
    with pytest.raises(StateError, match=r"no layer window has room for 2 more keyed facts \(4 each; held layers "
                                         r"1-2: 4, layers 3-4: 3\)"):
        u.forget(RECORDS_1, into=d, **TINY)
    # the frozen weights are as they were (the other window's ranks were folded in while a request trained)
    for n, m in u.model.named_modules():
        if hasattr(m, "weight"):
            assert torch.equal(m.weight, weights[n]), n

    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1, 2, 3, 4] and cfg["r"] == 4
    assert cfg["rank_pattern"] == {"model.layers.3.mlp.down_proj": 3, "model.layers.4.mlp.down_proj": 3}
    st = State.open(d)
    assert {n: a.shape[0] for n, a in st.A.items()} == {"layers.1.mlp.down_proj": 4, "layers.2.mlp.down_proj": 4,
                                                       "layers.3.mlp.down_proj": 3, "layers.4.mlp.down_proj": 3}

    _peft_matches(u, d, monkeypatch)  # PEFT reads the per-layer ranks and gives our logits

    # revoking the request in 3-4 empties that window: the adapter is back on layers 1-2, unchanged there
    before = _tensors(d)
    u.revoke(d, r2.request_id, evaluate_after=False)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1, 2] and cfg["rank_pattern"] == {}
    after = _tensors(d)
    assert set(after) == {k for k in before if ".layers.1." in k or ".layers.2." in k}
    assert all(torch.equal(after[k], before[k]) for k in after)
    # and the first window's request order is kept: revoking r1 leaves r3's rank
    u.revoke(d, r1.request_id, evaluate_after=False)
    st = State.open(d)
    for name, a in st.A.items():
        assert torch.equal(a, before[lora.peft_key(name, "lora_A")][3:4])


def test_a_request_into_a_later_window_is_the_same_whatever_the_unlearner_served_before(
        tmp_path_factory, default_dir, tmp_path, monkeypatch):
    """The preserved text's moments are cached per layout; in a later window they are read with the earlier
    windows' ranks folded in, so the cache must know which ranks those were. Same request, same state: an
    Unlearner that served the state's history and a fresh one give the same adapter."""
    import shutil

    from conftest import make_tiny_lm
    from lune_fast.api import Unlearner

    monkeypatch.setenv("LUNE_FAST_MOMENTS", "")  # the fresh Unlearner computes, not reads the served one's
    folder = make_tiny_lm("llama", tmp_path_factory.mktemp("narrow_lm2"), default_dir, num_hidden_layers=6,
                          intermediate_size=8, tie_word_embeddings=True)
    u = Unlearner(str(folder), dtype="float32")
    d = tmp_path / "state"
    r1 = u.forget(RECORDS_2, into=d, **TINY)  # layers 1-2
    u.forget(RECORDS_1 + RECORDS_2[:1], into=d, **TINY)  # 3 more: layers 3-4, read with r1 folded in
    u.revoke(d, r1.request_id, evaluate_after=False)
    u.forget(RECORDS_2 + RECORDS_1[:1], into=d, **TINY)  # 4 facts: layers 1-2 again, now other ranks
    shutil.copytree(d, tmp_path / "copy")
    served = u.forget(RECORDS_1[1:], into=d, **TINY)  # 1-2 is full: 3-4, read with the new 1-2 ranks folded in
    fresh = Unlearner(str(folder), dtype="float32").forget(RECORDS_1[1:], into=tmp_path / "copy", **TINY)
    assert served.config["layers"] == fresh.config["layers"] == [3, 4]
    for k, t in served.adapter.items():
        assert torch.equal(t, fresh.adapter[k]), k


def test_a_later_windows_text_moments_are_computed_once_whatever_a_request_leaves_off(
        tmp_path_factory, default_dir, tmp_path, monkeypatch):
    """A request into a later window trains with the earlier ranks of its subjects left off (State.folded_outside's
    `off`), but its preserved text is read with the whole state acting: requests into one window that leave
    different facts off share one computation of the text's moments."""
    from conftest import make_tiny_lm
    from lune_fast import keyed
    from lune_fast.api import Unlearner

    monkeypatch.setenv("LUNE_FAST_MOMENTS", "")  # computed in process only, so every computation is seen
    folder = make_tiny_lm("llama", tmp_path_factory.mktemp("narrow_lm3"), default_dir, num_hidden_layers=6,
                          intermediate_size=8, tie_word_embeddings=True)
    u = Unlearner(str(folder), dtype="float32")
    d = tmp_path / "state"
    u.forget(RECORDS_2 + [{"prompt": "The capital of Egypt is", "target": "Cairo"}], into=d, **TINY)  # 1-2 full
    reads, offs = [], []
    real_read, real_fold = keyed.read_lines, State.folded_outside
    monkeypatch.setattr(keyed, "read_lines", lambda path: reads.append(path) or real_read(path))
    monkeypatch.setattr(State, "folded_outside", lambda st, model, layout, off=frozenset():
                        offs.append(off) or real_fold(st, model, layout, off))
    r2 = u.forget(RECORDS_1, into=d, **TINY)  # France, Hamlet: layers 3-4, read with the first window folded
    assert r2.config["layers"] == [3, 4] and len(reads) == 1
    r3 = u.forget([{"prompt": "The currency of France is the", "target": "euro"}], into=d, **TINY)
    r4 = u.forget([{"prompt": "The tallest mountain on Earth is", "target": "Mount Everest"}], into=d, **TINY)
    assert r3.config["layers"] == r4.config["layers"] == [3, 4]
    assert (r2.request_id, 0) in set().union(*offs)  # r3 trained with request 2's France left off
    assert len(reads) == 1, reads


def test_a_folds_digest_is_computed_once_and_names_the_ranks_values():
    from lune_fast.state import Folded

    a, b = torch.randn(2, 6), torch.randn(5, 2)
    one = Folded("state", ("r0001",), (), {"layers.1.mlp.down_proj": (a, b)})
    first = one.digest()
    assert first == Folded("state", ("r0002",), (), {"layers.1.mlp.down_proj": (a.clone(), b.clone())}).digest()
    assert first != Folded("state", ("r0001",), (), {"layers.1.mlp.down_proj": (a, -b)}).digest()
    one.ranks["layers.2.mlp.down_proj"] = (a, b)  # not looked at again: the first answer stands
    assert one.digest() == first
