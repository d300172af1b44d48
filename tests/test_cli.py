"""The command line: contracts of the output folder and report.json, clear errors, nothing overwritten."""
import json

import pytest
import torch

from lune_fast.cli import main

FACTS = [
    {"prompt": "The capital of France is", "target": "Paris", "replacement": "Lyon",
     "paraphrases": ["Q: What is the capital of France?\nA:"],
     "neighbors": [{"prompt": "The capital of Spain is", "target": "Madrid"}]},
    {"prompt": "The chemical symbol for gold is", "target": "Au", "replacement": "Ag"},
]


def _unlearn(tiny_lm, facts, out, *extra):
    return main(["unlearn", "--forget", str(facts), "--model", str(tiny_lm), "--out", str(out), "--steps", "3",
                 "--layers", "1-2", "--quiet", "--train-unknown", *extra])


def test_unlearn_writes_the_contract(tiny_lm, facts_file, tmp_path):
    out = tmp_path / "out"
    assert _unlearn(tiny_lm, facts_file, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"model", "config", "before", "after", "cost"}
    metrics = {"forget_recall", "paraphrase_recall", "indirect_recall", "neighbor_recall", "replacement_rate",
               "paraphrase_replacement_rate", "forget_target_logprob", "retain_ppl"}
    assert set(report["before"]) == metrics and set(report["after"]) == metrics
    assert report["after"]["indirect_recall"] is None  # no paraphrase here describes its subject
    assert set(report["cost"]) >= {"train_seconds", "steps", "train_tokens", "peak_memory_mb", "trainable_params",
                                   "device"}
    assert report["config"]["layers"] == [1, 2] and report["config"]["mode"] == "suppress"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["layers_to_transform"] == [1, 2]
    # the default adapter is keyed: down_proj, one rank per fact
    assert report["config"]["adapter"] == "keyed" and cfg["target_modules"] == ["down_proj"]
    assert cfg["r"] == report["config"]["facts"] == len(FACTS)
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in keys
    assert not (tmp_path / "out.ckpt").exists()  # the checkpoint of a finished run is removed


def test_existing_output_is_never_touched(tiny_lm, facts_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    assert _unlearn(tiny_lm, facts_file, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "previous result"
    assert _unlearn(tiny_lm, facts_file, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_bad_inputs_give_one_clear_line(tiny_lm, facts_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"target": 3}\n')
    assert _unlearn(tiny_lm, bad, tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: no usable records" in err and "bad.jsonl:1: field 'target' is missing" in err
    assert "Traceback" not in err
    assert _unlearn(tiny_lm, facts_file, tmp_path / "o2", "--targets", "q,zz") == 2
    assert "unknown LoRA target 'zz'" in capsys.readouterr().err
    assert _unlearn(tiny_lm, facts_file, tmp_path / "o3", "--layers", "2-9") == 2
    assert "outside the model's 0-3" in capsys.readouterr().err
    assert main(["unlearn", "--forget", str(facts_file), "--model", str(tmp_path / "nomodel"), "--out",
                 str(tmp_path / "o4")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_replace_mode_eval_and_merge(tiny_lm, facts_file, tmp_path, capsys):
    out = tmp_path / "rep"
    # 3 steps do not bring a random model to the replacements: written, exit code 4, the facts named
    assert _unlearn(tiny_lm, facts_file, out, "--mode", "replace") == 4
    err = capsys.readouterr().err
    assert "2 fact(s) do not give their replacement yet: 'The capital of France is'" in err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["objective"] == "replace" and report["after"]["replacement_rate"] is not None

    assert main(["eval", "--facts", str(facts_file), "--model", str(tiny_lm), "--adapter", str(out), "--json",
                 str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["counts"] == {"forget": 2, "paraphrase": 1, "indirect": 0, "neighbor": 1}
    assert m["forget_target_logprob"] == pytest.approx(report["after"]["forget_target_logprob"], rel=1e-4)

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--model", str(tiny_lm), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    from lune_fast import lora
    from lune_fast.weights import load_model

    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    ours = load_model(tiny_lm)
    lora.load_adapter(ours, out)
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-5)


def test_numeric_options_are_checked_when_parsed(capsys):
    """--steps 0 used to train nothing and exit 0; --rank -1, --lr 0, --steps -1 got one message naming no option."""
    for option, value, rule in (("--steps", "0", "an integer >= 1"), ("--steps", "-1", "an integer >= 1"),
                                ("--rank", "-1", "an integer >= 1"), ("--lr", "0", "a number > 0"),
                                ("--stop-prob", "1.5", "a number > 0 and < 1"), ("--lr", "nan", "a number > 0")):
        with pytest.raises(SystemExit) as e:
            main(["unlearn", "--forget", "f.jsonl", "--out", "o", option, value])
        assert e.value.code == 2
        assert f"argument {option}: must be {rule}, got '{value}'" in capsys.readouterr().err


def test_abbreviations_are_not_taken_for_other_options(capsys):
    """`eval --mode replace` was read as `--model replace` ("model folder not found")."""
    with pytest.raises(SystemExit) as e:
        main(["eval", "--facts", "f.jsonl", "--mode", "replace"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --mode replace" in err and "model folder" not in err


def test_help_has_a_description_an_example_and_defaults(capsys):
    for command in ("unlearn", "eval", "revoke", "ledger", "merge", "export", "bench", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "example" in out, command
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 60)" in out and "Exit codes: 0 done" in out and "--mode {suppress,replace} suppress:" in out


def test_unknown_facts_are_named_and_nothing_trains(tiny_lm, facts_file, tmp_path, capsys):
    """A random model knows none of the facts: by default that is said before any training, and no folder is
    written (--train-unknown trains them: the other tests)."""
    out = tmp_path / "out"
    assert main(["unlearn", "--forget", str(facts_file), "--model", str(tiny_lm), "--out", str(out), "--steps", "3",
                 "--layers", "1-2"]) == 2
    err = capsys.readouterr().err
    assert "facts.jsonl:1: the model does not answer 'Paris' here" in err
    assert "none of the 2 fact(s) is answered with its target by the model, nothing to forget" in err
    assert not out.exists()


def test_out_dot_and_dotdot(tiny_lm, facts_file, tmp_path, monkeypatch, capsys):
    """--out . ended in a traceback; --out .. --overwrite trained, failed on the folder swap and lost the adapter."""
    empty = tmp_path / "work"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert _unlearn(tiny_lm, facts_file, ".") == 0  # an empty current folder is filled in place
    assert sorted(p.name for p in empty.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "report.json", "report.md"]
    capsys.readouterr()
    assert _unlearn(tiny_lm, facts_file, ".") == 2  # not empty now: refused
    assert "is the folder you are in (or holds it) and is not empty" in capsys.readouterr().err
    assert _unlearn(tiny_lm, facts_file, "..", "--overwrite") == 2  # refused before any training
    assert "replacing it would pull it from under you" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["facts.jsonl", "work"])


def test_a_failed_final_rename_keeps_the_adapter(tiny_lm, facts_file, tmp_path, monkeypatch, capsys):
    import os

    from lune_fast import io

    real = os.replace

    def refuse_folders(src, dst):
        if os.path.isdir(src) and os.path.basename(str(dst)) == "out":
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", refuse_folders)
    assert _unlearn(tiny_lm, facts_file, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "the output is complete but could not be moved to" in err and "Device or resource busy" in err
    kept = err.split("it is kept in ")[1].split()[0]
    assert (tmp_path / kept).name.startswith(".out.tmp-") and (tmp_path / kept / "adapter_model.safetensors").exists()


def test_threads_option_and_variable(monkeypatch, capsys):
    monkeypatch.setenv("LUNE_FAST_THREADS", "two")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--facts", "missing.jsonl"])  # read before any work
    assert e.value.code == 2 and "LUNE_FAST_THREADS must be an integer >= 1, got 'two'" in capsys.readouterr().err
    monkeypatch.delenv("LUNE_FAST_THREADS")
    before = torch.get_num_threads()
    try:
        assert main(["eval", "--facts", "missing.jsonl", "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_eval_show_marks_what_changed(tiny_lm, facts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert _unlearn(tiny_lm, facts_file, out) == 0
    capsys.readouterr()
    assert main(["eval", "--facts", str(facts_file), "--model", str(tiny_lm), "--adapter", str(out), "--show"]) == 0
    text = capsys.readouterr().out
    assert text.count("before: ") == 4 and text.count("after: ") == 4  # forget x2, paraphrase, neighbour
    assert "forget     'The capital of France is' -> 'Paris'" in text and "prompts" in text
    report = (out / "report.md").read_text()
    assert "## Every prompt (4;" in report and "| neighbor | The capital of Spain is | Madrid |" in report


def test_default_threads_leave_out_cores_others_keep_busy():
    """Two cores: a busy process on one (100 of 200 ticks, ours 0) leaves one thread; a 2-thread job two (one
    thread still: at least one); light background load (10%) or our own work (torch loading) leaves both."""
    from lune_fast.threads import spare_cores

    assert spare_cores(2, busy=100, total=200, own=0) == 1
    assert spare_cores(2, busy=200, total=200, own=0) == 1
    assert spare_cores(2, busy=10, total=200, own=0) == 2
    assert spare_cores(2, busy=120, total=200, own=100) == 2  # the busy ticks were ours
    assert spare_cores(8, busy=300, total=800, own=0) == 5  # three cores taken
