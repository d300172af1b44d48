"""torchrun with 2 CPU processes (gloo): the same adapter as one process, for data parallel and FSDP2; a rank
that fails ends the whole job with its error instead of hanging."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err

FACTS = [{"prompt": p, "target": t} for p, t in [
    ("The capital of France is", "Paris"), ("The chemical symbol for gold is", "Au"),
    ("The largest planet is", "Jupiter"), ("Water is made of hydrogen and", "oxygen"),
    ("The author of Hamlet is", "William Shakespeare")]]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture
def one_thread():
    """One intra-op thread, as each torchrun rank has, for this test only (later tests keep the suite's count:
    bf16 sums, and so some outcomes, differ with the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(tiny_lm, facts, out, *extra):  # noqa: D103 (the same run for one and for two processes)
    return ["unlearn", "--forget", str(facts), "--model", str(tiny_lm), "--out", str(out), "--layers", "1-3",
            "--steps", "4", "--stop-prob", "1e-12", "--lr", "1e-2", "--dtype", "float32", "--quiet",
            "--targets", "q,v,gate,up,down", "--train-unknown", *extra]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def _torchrun(args, env_extra=None, timeout=300, script=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    target = [str(script)] if script else ["-m", "lune_fast.cli"]
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *target, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tiny_lm, facts_file, tmp_path, mode, one_thread):
    from lune_fast.cli import main

    plain = ["--adapter", "plain"] if mode == "fsdp" else []  # FSDP trains plain LoRA; DDP the keyed default
    assert main(_args(tiny_lm, facts_file, tmp_path / "one", *plain)) == 0
    extra = ["--fsdp", *plain] if mode == "fsdp" else []
    proc = _torchrun(_args(tiny_lm, facts_file, tmp_path / "two", *extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:  # float32, different reduction order
        assert rel_err(two[k], one[k]) <= 1e-4, k
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    # evaluation runs on every rank (through the sharded blocks under FSDP) and agrees with one process
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    for key in ("forget_target_logprob", "retain_ppl"):
        assert abs(r2["after"][key] - r1["after"][key]) <= 1e-3 * abs(r1["after"][key]), key


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_holding_finished_columns_under_data_parallel_matches_one_process(tiny_lm, facts_file, tmp_path,
                                                                         one_thread):
    """--hold-done on two ranks: the columns some rank trained are gathered, so both ranks hold the same ones
    and the adapter is one process's. A stop threshold between the facts' probabilities makes some facts
    finish while others train (without --hold-done the adapter differs: the holding ran)."""
    from lune_fast.cli import main

    # AdamW: holding is for its momentum (column steps have none, and finish every fact of this model at once)
    hold = ["--hold-done", "--hold-margin", "1", "--stop-prob", "1e-5", "--optimizer", "adamw"]
    assert main(_args(tiny_lm, facts_file, tmp_path / "free", "--stop-prob", "1e-5", "--optimizer", "adamw")) == 0
    assert main(_args(tiny_lm, facts_file, tmp_path / "one", *hold)) == 0
    proc = _torchrun(_args(tiny_lm, facts_file, tmp_path / "two", *hold))
    assert proc.returncode == 0, proc.stderr[-4000:]
    free, one, two = (_adapter(tmp_path / d) for d in ("free", "one", "two"))
    for k in one:
        assert rel_err(two[k], one[k]) <= 1e-4, k
    assert max(rel_err(one[k], free[k]) for k in one if "lora_B" in k) > 1e-2


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_recall_rounds_run_under_data_parallel(tiny_lm, facts_file, tmp_path):
    """Each rank asks its share of the prompts again, the answers are gathered, and every rank trains the same
    continuation: the adapter equals one process's (greedy answers stubbed: a random model says no facts)."""
    script = Path(__file__).parent / "scripts" / "recall_stub.py"
    args = [str(facts_file), "unlearn", "--forget", str(facts_file), "--model", str(tiny_lm), "--layers", "1-3",
            "--steps", "12", "--stop-prob", "2e-5", "--lr", "1e-2", "--optimizer", "adamw", "--dtype", "float32",
            "--quiet", "--no-eval", "--recall-rounds", "1"]
    one = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _torchrun([*args, "--out", str(tmp_path / "two")], script=script)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "greedy calls [5]" in one.stderr  # one process: all five prompts
    assert "greedy calls [3]" in two.stderr and "greedy calls [2]" in two.stderr  # each rank its share
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text())["cost"] for d in ("one", "two"))
    assert r1["recall_rounds"] == r2["recall_rounds"] == 1 and r1["steps"] == r2["steps"]
    assert r1["train_tokens"] == r2["train_tokens"]  # counted over every rank
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert _rel_l2(b, a) <= 1e-4


def _rel_l2(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over every tensor of two adapters."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_a_failing_rank_ends_the_job(tiny_lm, facts_file, tmp_path):
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "import os, sys\n"
        "from lune_fast import trainer\n"
        "real = trainer.forget_loss\n"
        "def boom(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('rank 1 failed on purpose')\n"
        "    return real(*a, **k)\n"
        "trainer.forget_loss = boom\n"
        "from lune_fast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = _torchrun(_args(tiny_lm, facts_file, tmp_path / "o"), script=script, timeout=180,
                     env_extra={"TORCHELASTIC_ERROR_FILE": str(tmp_path / "err.json")})
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_evaluation_shares_gather_back_in_order(tmp_path):
    # evaluation splits its prompts every world-th across ranks; an odd count leaves the ranks unequal shares
    script = tmp_path / "roundtrip.py"
    script.write_text(
        "from lune_fast import distributed\n"
        "d = distributed.from_env()\n"
        "items = [f'p{i}' for i in range(7)]\n"
        "mine = distributed.shard(items, d)\n"
        "back = distributed.unshard([s.upper() for s in mine], len(items), d)\n"
        "assert back == [s.upper() for s in items], back\n"
        f"open(r'{tmp_path}' + f'/rank{{d.rank}}', 'w').write(str(len(mine)))\n"
        "d.close()\n")
    proc = _torchrun([], script=script, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["4", "3"]


# -- the default model, every mode and adapter kind: slow (make test-all) ------------------------------------
@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """One-process float32 runs on 8 of the package's facts, per (mode, adapter), made once for the module."""
    from lune_fast.assets import asset

    folder = tmp_path_factory.mktemp("ranks")
    records = [json.loads(line) for line in asset("facts.jsonl").read_text().splitlines()][::6][:8]
    facts = folder / "facts8.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder, facts, {}


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("mode,adapter", [("suppress", "keyed"), ("suppress", "plain"), ("replace", "keyed"),
                                          ("replace", "plain")])
def test_default_model_gives_one_process_adapter_on_any_number_of_ranks(one_process_runs, mode, adapter, ranks):
    """The defaults (recall rounds included) under torchrun, float32: the adapter of one process and the same
    metrics. (In bfloat16 a CPU's kernels round differently with the thread count, one process included: see
    RESULTS.md section 8.)"""
    folder, facts, done = one_process_runs
    args = ["unlearn", "--forget", str(facts), "--mode", mode, "--adapter", adapter, "--dtype", "float32", "--quiet"]
    one = folder / f"{mode}-{adapter}-1"
    if (mode, adapter) not in done:
        proc = subprocess.run([sys.executable, "-m", "lune_fast.cli", *args, "--out", str(one)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        done[(mode, adapter)] = True
    many = folder / f"{mode}-{adapter}-{ranks}"
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), "-m", "lune_fast.cli",
                           *args, "--out", str(many)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _rel_l2(_adapter(many), _adapter(one)) <= 5e-3
    r1, rn = (json.loads((d / "report.json").read_text()) for d in (one, many))
    for key in ("forget_recall", "paraphrase_recall", "neighbor_recall", "replacement_rate"):
        assert rn["after"][key] == r1["after"][key], key
    assert (rn["cost"]["steps"], rn["cost"]["recall_rounds"]) == (r1["cost"]["steps"], r1["cost"]["recall_rounds"])
