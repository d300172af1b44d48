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


def test_a_bf16_run_stays_forgotten_when_the_model_is_loaded_in_float32_or_float16():
    """The defaults train in bf16 and their recall rounds also ask the float32 model (the adapter shared): the
    adapter, attached as PEFT's files hold it to the model loaded in float32 (transformers' default) or float16
    (GPU serving), gives none of the forgotten answers there either. float16 reads the adapter as float32 does,
    within the rounding the base model itself shows between the two (derived here, not fitted)."""
    import torch

    from lune_fast.data import make_batch, read_facts
    from lune_fast.evaluate import answer_logprobs, answers_with, greedy
    from lune_fast.weights import load_model

    records = [json.loads(l) for l in asset("facts.jsonl").read_text().splitlines()][1::6][:8]
    u = Unlearner("default", dtype="bfloat16")
    r = u.forget(records, progress=False, evaluate_before=False, evaluate_after=False)
    assert r.config["checked_in"] == ["bfloat16", "float32"]
    facts = read_facts(records).facts
    pairs = make_batch([u.encoder.pair(f.prompt, f.target, False) for f in facts], u.encoder.pad_id)
    logprobs = {}
    for dtype in (torch.float32, torch.float16):
        m = load_model(u.model_dir, dtype=dtype, pack=False)
        with torch.no_grad():
            base = answer_logprobs(m, pairs).double()
            r.attach_to(m)
            said = greedy(m, u.encoder, [u.encoder.prompt_ids(f.prompt, False) for f in facts], 24)
            logprobs[dtype] = (base, answer_logprobs(m, pairs).double())
        leaks = [f.prompt for f, g in zip(facts, said) if answers_with(u.encoder.decode(g), f.target)]
        assert not leaks, f"{dtype}: {leaks}"
    (b32, a32), (b16, a16) = logprobs[torch.float32], logprobs[torch.float16]
    rounding = (b16 - b32).abs().max().item()  # float16 against float32 on the base model
    # the adapter moves the answer by several nats; float16 stays within a few times the base model's own
    # float16-float32 rounding of float32 (measured 2.2x on an AMX Xeon, 1.3x under ONEDNN_MAX_CPU_ISA=AVX2)
    assert (a16 - a32).abs().max().item() <= 4 * rounding + 1e-3, ((a16 - a32).abs().max().item(), rounding)
    assert (a32 - b32).max().item() < -2
