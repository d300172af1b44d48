"""A short real unlearning run on the embedded default model (SmolLM2-135M-Instruct)."""
import json

from lune_fast.api import Unlearner, asset


def test_forgetting_real_facts_lowers_recall(tmp_path):
    records = [json.loads(l) for l in asset("facts.jsonl").read_text().splitlines()][::12][:4]
    unknown = {"prompt": "The capital of France is", "target": "Lyon"}  # the model says Paris: nothing to forget
    u = Unlearner("default")
    result = u.forget(records + [unknown], progress=False)
    assert result.before["forget_recall"] == 1.0  # the shipped facts are ones the model knows
    # the unknown fact was named and left out of training, with what the model says instead
    assert len(result.skipped) == 1 and "does not answer 'Lyon'" in result.skipped[0] and "Paris" in result.skipped[0]
    assert result.config["facts"] == 4 and "The capital of France is" not in [f.prompt for f in result.facts]
    assert result.after["forget_recall"] <= 0.25
    assert result.after["forget_target_logprob"] < result.before["forget_target_logprob"] - 2
    assert result.cost["steps"] >= 1 and result.stopped in ("criterion", "max_steps")
    # locality of the keyed default: same-kind neighbours and general text stay (measured 0.75 and x1.002; plain
    # LoRA on the same four facts keeps 0.17 of the neighbours at x1.05 perplexity)
    assert result.before["neighbor_recall"] == 1.0 and result.after["neighbor_recall"] >= 0.6
    assert result.after["retain_ppl"] <= 1.02 * result.before["retain_ppl"]
    # the model object is left as it was: no adapters attached
    from lune_fast import lora

    assert not lora.adapters_of(u.model)
    out = result.save(tmp_path / "o")
    assert json.loads((out / "report.json").read_text())["after"]["forget_recall"] == result.after["forget_recall"]
