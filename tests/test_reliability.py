"""Faults and bad inputs: every one answered clearly, nothing lost (see docs/RELIABILITY.md)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lune_fast.cli import main
from lune_fast.data import DataError, read_facts

REPO = Path(__file__).resolve().parent.parent
FACTS = [{"prompt": "The capital of France is", "target": "Paris"},
         {"prompt": "The chemical symbol for gold is", "target": "Au"}]

# -- 1. fuzzed readers ------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12)
record_like = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=40), st.integers(), st.none()),
    "target": st.one_of(st.text(max_size=20), st.integers(), st.lists(st.text(max_size=5), max_size=2)),
    "question": st.text(max_size=20), "answer": st.one_of(st.text(max_size=10), st.none()),
    "paraphrases": json_values, "neighbors": json_values, "requested_rewrite": json_values,
    "ground_truth": json_values, "target_new": json_values, "locality_ground_truth": json_values})
lines = st.lists(st.one_of(record_like.map(json.dumps), json_values.map(json.dumps),
                           st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                           st.text(max_size=30)), min_size=0, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines, raw_tail=st.binary(max_size=16))
def test_fuzzed_readers_load_or_fail_clearly(tmp_path, lines, raw_tail):
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw_tail)
    try:
        r = read_facts(p)
    except DataError as e:
        assert str(p) in str(e)  # the error names the file (and the line where it applies)
        return
    for f in r.facts:
        assert isinstance(f.prompt, str) and f.prompt.strip() and isinstance(f.target, str) and f.target.strip()
    for s in r.skipped:
        assert s.startswith(f"{p}:")


def test_huge_strings_are_refused_with_the_numbers(tmp_path):
    p = tmp_path / "huge.jsonl"
    p.write_text(json.dumps({"prompt": "x" * 30000, "target": "y"}) + "\n" + json.dumps(FACTS[0]) + "\n")
    r = read_facts(p)
    assert len(r.facts) == 1 and "field 'prompt' is 30,000 characters; the limit is 20,000" in r.skipped[0]


# -- 3. outputs -------------------------------------------------------------------------------------------------
def test_failed_save_keeps_previous_output(tmp_path, monkeypatch):
    import errno

    from lune_fast.api import ForgetResult

    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"previous good adapter")
    r = ForgetResult(adapter={"w": torch.ones(2)}, adapter_config={"peft_type": "LORA"}, before={}, after={},
                     cost={}, config={}, model="m")
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        r.save(out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == b"previous good adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or temporary folder


# -- 4. interruptions -------------------------------------------------------------------------------------------
def _cli(tiny_lm, facts, out, *extra):
    return [sys.executable, "-m", "lune_fast.cli", "unlearn", "--forget", str(facts), "--model", str(tiny_lm),
            "--out", str(out), "--layers", "1-3", "--steps", "150", "--stop-prob", "1e-12", "--lr", "1e-3",
            "--dtype", "float32", "--no-eval", "--quiet", "--checkpoint-every", "1", *extra]


def _wait_for_step(ckpt: Path, step: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((ckpt / "state.json").read_text())["step"] >= step:
                return True
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_sigkill_then_resume_gives_the_same_adapter(tiny_lm, facts_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_out = tmp_path / "ref"
    subprocess.run(_cli(tiny_lm, facts_file, ref_out), check=True, env=env, capture_output=True)
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_lm, facts_file, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for_step(tmp_path / "run.ckpt", 5, proc), "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half written
    again = subprocess.run(_cli(tiny_lm, facts_file, out), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    subprocess.run(_cli(tiny_lm, facts_file, out, "--resume"), check=True, env=env, capture_output=True)
    want, got = _adapter(ref_out), _adapter(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not (tmp_path / "run.ckpt").exists()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_lm, facts_file, tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run.ckpt"
    proc = subprocess.Popen(_cli(tiny_lm, facts_file, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_step(ckpt, 2, proc), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command with --resume" in err and str(ckpt) in err and "Traceback" not in err
    assert json.loads((ckpt / "state.json").read_text())["step"] >= 2 and not out.exists()


# -- 5. divergence ----------------------------------------------------------------------------------------------
def test_divergence_keeps_last_good_adapter_and_says_what_to_change(tiny_lm, facts_file, tmp_path, monkeypatch,
                                                                     capsys):
    from lune_fast import trainer

    real, calls = trainer.forget_loss, {"n": 0}

    def blow_up(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * (float("inf") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(trainer, "forget_loss", blow_up)
    out = tmp_path / "o"
    rc = main(["unlearn", "--forget", str(facts_file), "--model", str(tiny_lm), "--out", str(out), "--layers", "1-2",
               "--steps", "10", "--stop-prob", "1e-12", "--no-eval", "--quiet", "--lr", "1e-3"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "NaN/inf at step 3; the adapter of step 2 was kept. Lower the learning rate (now --lr 0.001)" in err
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] == "diverged" and report["cost"]["steps"] == 2
    assert all(torch.isfinite(t).all() for t in _adapter(out).values())


# -- 6. resource limits -----------------------------------------------------------------------------------------
def test_prompt_longer_than_context_is_refused_up_front(tiny_lm, tmp_path, capsys):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"prompt": "word " * 300, "target": "x"}) + "\n")
    rc = main(["unlearn", "--forget", str(p), "--model", str(tiny_lm), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "exceed the model's context of 256 tokens" in err and "long.jsonl:1: 30" in err


def test_batch_over_memory_budget_is_refused_with_numbers(tiny_lm, facts_file, tmp_path, monkeypatch, capsys):
    from lune_fast import limits

    monkeypatch.setattr(limits, "available_bytes", lambda device: 1000)
    rc = main(["unlearn", "--forget", str(facts_file), "--model", str(tiny_lm), "--out", str(tmp_path / "o"),
               "--layers", "1-2", "--quiet", "--train-unknown"])  # a random model knows none of them
    assert rc == 2
    err = capsys.readouterr().err
    assert "GiB of activations" in err and "are available on cpu" in err and "--max-batch-tokens" in err


def test_large_forget_sets_are_split_into_micro_batches():
    from lune_fast.limits import split_by_tokens

    pairs = [([1] * 30, [2] * 5)] * 10
    groups = split_by_tokens(pairs, 100)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2] and sum(map(len, groups)) == 10


# -- 7. no code execution from data ----------------------------------------------------------------------------
def test_nothing_sets_trust_remote_code_or_unpickles():
    sources = "\n".join(p.read_text() for p in (REPO / "lune_fast").rglob("*.py"))
    assert "trust_remote_code=True" not in sources
    assert "torch.load(" not in sources and "pickle.load" not in sources
