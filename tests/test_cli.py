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
                 "--layers", "1-2", "--quiet", *extra])


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


def test_replace_mode_eval_and_merge(tiny_lm, facts_file, tmp_path):
    out = tmp_path / "rep"
    assert _unlearn(tiny_lm, facts_file, out, "--mode", "replace") == 0
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
