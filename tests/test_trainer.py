"""The trainer: stop criterion, prefix cache, checkpoints and resume, Ctrl-C, divergence."""
import os
import signal
import sys

import pytest
import torch

from lune_fast import lora, trainer
from lune_fast.checkpoints import CheckpointMismatch
from lune_fast.data import make_batch
from lune_fast.trainer import RunOptions, TrainData, TrainingDiverged, TrainingInterrupted, TrainSettings, train
from lune_fast.weights import load_model

PAIRS = [([3, 17, 42, 9], [100, 7]), ([5, 6], [11, 12, 13]), ([88, 1, 2], [150])]
LS = lora.LoraSettings(rank=4, alpha=8, targets=("gate", "up", "down", "q"), layers=(1, 2))


def _train(model, pairs, settings: TrainSettings, ls=LS, **run):
    """Attach fresh adapters (as every caller of train does) and train on one micro-batch of `pairs`."""
    lora.attach(model, ls, seed=settings.seed)
    return train(model, TrainData([make_batch(pairs)]), settings, RunOptions(progress=False, **run))


def _run(tiny_llama, **kw):
    model = load_model(tiny_llama)
    settings = TrainSettings(**{"lr": 5e-3, "steps": 6, "stop_prob": 1e-9, **kw.pop("settings", {})})
    return model, _train(model, PAIRS, settings, **kw)


def test_probabilities_fall_and_criterion_stops(tiny_llama):
    model, out = _run(tiny_llama, settings={"stop_prob": 0.002, "steps": 200, "lr": 1e-2})
    assert out.stopped == "criterion" and out.steps < 200
    assert max(out.final_mean_prob) < 0.002
    assert out.tokens == out.steps * make_batch(PAIRS).n_tokens


def test_prefix_cache_equals_full_forward(tiny_llama):
    model = load_model(tiny_llama)
    adapters = lora.attach(model, LS)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.3)
        batch = make_batch(PAIRS)
        part = trainer._precompute(model, batch, L0=1)
        cached = trainer._hidden_at_answers(model, part, 1)
        full = model(batch.input_ids, return_hidden=True, select=batch.sel)
    assert torch.allclose(cached, full, rtol=1e-5, atol=1e-6)


# per-example stopping that drops finished answers from the batch (and brings back those that return)
SHRINKING = {"per_example_stop": True, "stop_prob": 0.003, "lr": 5e-2, "objective": "ga", "steps": 8}


@pytest.mark.parametrize("settings", [{}, SHRINKING, {"optimizer": "settle", "lr": 0.05}],
                         ids=["plain", "shrinking-batch", "settling-columns"])
def test_interrupt_then_resume_is_bit_identical(tiny_llama, tmp_path, settings, monkeypatch):
    pairs = PAIRS + [([4, 4, 4], [9, 9]), ([7, 8], [60])]
    monkeypatch.setattr(sys.modules[__name__], "PAIRS", pairs)
    ref_model, ref = _run(tiny_llama, settings=settings)
    want = lora.adapter_state(ref_model)
    if settings.get("per_example_stop"):
        assert ref.tokens < ref.steps * make_batch(pairs).n_tokens  # finished answers left the batch

    ckpt = tmp_path / "run.ckpt"

    def ctrl_c(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the end of this step

    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 3: a checkpoint .* --resume"):
        _run(tiny_llama, checkpoint_dir=ckpt, on_step=ctrl_c, settings=settings)
    assert (ckpt / "state.json").exists() and (ckpt / "state.safetensors").exists()
    # NPO's reference was read off the first forward: the checkpoint keeps it for the resumed run
    from safetensors.torch import load_file
    assert ("reference.0" in load_file(str(ckpt / "state.safetensors"))) == (settings.get("objective") is None)
    model, out = _run(tiny_llama, checkpoint_dir=ckpt, resume=True, settings=settings)
    assert out.steps == ref.steps
    got = lora.adapter_state(model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_checkpoint_without_references_resumes_with_the_adapters_off_ones(tiny_llama, tmp_path):
    """A checkpoint written before references were kept resumes: its reference is taken adapters off."""
    import json

    ref_model, ref = _run(tiny_llama)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingInterrupted):
        _run(tiny_llama, checkpoint_dir=ckpt, on_step=lambda step: step == 3 and os.kill(os.getpid(), signal.SIGINT))
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["references"] == 1
    meta.pop("references")
    (ckpt / "state.json").write_text(json.dumps(meta))
    model, out = _run(tiny_llama, checkpoint_dir=ckpt, resume=True)
    assert out.steps == ref.steps
    want, got = lora.adapter_state(ref_model), lora.adapter_state(model)
    assert all(torch.allclose(want[k], got[k], rtol=1e-4, atol=1e-7) for k in want)


def test_a_subset_and_the_whole_set_that_never_agree_still_end(tiny_llama, monkeypatch):
    """The working subset says "all done" and the re-check on the whole forget set always says "not done" (a
    permanent disagreement, as bf16 rounding of two packings can make): every iteration must still take an
    optimizer step, so the run ends at `steps`, with at most one re-check per step."""
    steps = 30
    checks, forwards = [], []
    real_forward = trainer._forward

    def never_done(model, parts, L0):
        checks.append(1)
        return torch.ones(sum(p.batch.n_seq for p in parts))

    def counting(*a, **k):
        forwards.append(1)
        if len(forwards) > 2 * steps:  # two forwards per step at most; more means an iteration without a step
            raise AssertionError(f"{len(forwards)} forwards for {steps} steps")
        return real_forward(*a, **k)

    monkeypatch.setattr(trainer, "_final_probs", never_done)
    monkeypatch.setattr(trainer, "_forward", counting)
    monkeypatch.setattr(sys.modules[__name__], "PAIRS", PAIRS + [([4, 4, 4], [9, 9]), ([7, 8], [60])])
    _, out = _run(tiny_llama, settings={**SHRINKING, "steps": steps})
    assert out.steps == steps and out.stopped == "max_steps"
    assert len(checks) >= 2  # the disagreement was met (and the last call is the final read-out)
    assert len(checks) <= steps + 1


def test_resume_with_other_settings_is_refused(tiny_llama, tmp_path):
    ckpt = tmp_path / "c.ckpt"
    _run(tiny_llama, checkpoint_dir=ckpt, settings={"checkpoint_every": 2})
    with pytest.raises(CheckpointMismatch, match="other settings"):
        _run(tiny_llama, checkpoint_dir=ckpt, resume=True, settings={"lr": 1e-4})


@pytest.mark.parametrize("objective", ["npo", "npo_tok"])
def test_reference_at_rest_is_the_first_forward_and_equals_the_adapters_off_one(tiny_llama, monkeypatch, objective):
    """A run whose adapters write nothing yet (B = 0) takes the NPO reference from its first step's forward, with
    no forward of its own; it is the adapters-off reference to float32 rounding. A run that starts from trained
    adapters (a recall round) takes the adapters-off one, one forward a micro-batch."""
    seen, offs = [], []
    real_forward, real_reference = trainer._forward, trainer._reference
    monkeypatch.setattr(trainer, "_forward", lambda m, work, *a, **k: (
        seen.append(work[0]) if not seen else None) or real_forward(m, work, *a, **k))
    monkeypatch.setattr(trainer, "_reference", lambda *a: offs.append(1) or real_reference(*a))
    model = load_model(tiny_llama)
    settings = TrainSettings(objective=objective, lr=5e-3, steps=3, stop_prob=1e-9)
    lora.attach(model, LS, seed=0)
    batch = make_batch(PAIRS)
    part = trainer._precompute(model, batch, 1)
    off = real_reference(model, part, 1)  # B = 0 here
    train(model, TrainData([batch]), settings, RunOptions(progress=False))
    assert offs == [] and seen[0].ref_tok is not None  # the first forward filled it in
    assert (seen[0].ref_tok - off).abs().max() <= 1e-5 * off.abs().max()
    seen.clear()
    train(model, TrainData([batch]), settings, RunOptions(progress=False))  # trained adapters: B != 0
    assert offs == [1]
    assert torch.equal(seen[0].ref_tok, off)


def test_data_parallel_checkpoints_keep_nothing_per_rank(tiny_llama, tmp_path, monkeypatch):
    """Under data parallel one rank writes the checkpoint of all and each rank holds its own sequences: there the
    reference is the adapters-off one, and a checkpoint holds neither references nor the sequences still to
    train (a one-process group stands for the ranks)."""
    import json

    import torch.distributed as td
    from safetensors.torch import load_file

    from lune_fast.distributed import Dist

    offs = []
    real_reference = trainer._reference
    monkeypatch.setattr(trainer, "_reference", lambda *a: offs.append(1) or real_reference(*a))
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ckpt = tmp_path / "run.ckpt"
        _run(tiny_llama, checkpoint_dir=ckpt, dist=Dist(0, 1), settings={**SHRINKING, "objective": "npo",
                                                                          "checkpoint_every": 2})
    finally:
        td.destroy_process_group()
    assert offs == [1]
    assert not any(k.startswith("reference.") for k in load_file(str(ckpt / "state.safetensors")))
    assert json.loads((ckpt / "state.json").read_text())["work"] is None


@pytest.mark.parametrize("objective", ["ga", "simnpo"])
def test_objectives_without_a_reference_compute_none(tiny_llama, monkeypatch, objective):
    offs = []
    monkeypatch.setattr(trainer, "_reference", lambda *a: offs.append(1))
    model, out = _run(tiny_llama, settings={"objective": objective, "steps": 2})
    _train(model, PAIRS, TrainSettings(objective="replace", replace=True, lr=5e-3, steps=2))
    assert out.steps == 2 and offs == []


def test_nan_loss_keeps_last_good_adapter(tiny_llama, monkeypatch):
    real = trainer.forget_loss
    calls = {"n": 0}
    snapshots = {}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(trainer, "forget_loss", flaky)
    model = load_model(tiny_llama)

    def snap(step):
        snapshots[step] = {k: v.clone() for k, v in lora.adapter_state(model).items()}

    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 4; the adapter of step 3 was kept\. Lower the "
                                               r"learning rate \(now --lr 0\.005\)"):
        _train(model, PAIRS, TrainSettings(lr=5e-3, steps=6, stop_prob=1e-9), on_step=snap)
    now = lora.adapter_state(model)
    assert all(torch.equal(now[k], snapshots[3][k]) for k in now)


def test_per_example_stop_drops_finished_examples(tiny_llama):
    """With per-example stopping, an answer already below the threshold contributes no gradient: the update
    equals training on the other answers alone."""
    pairs = [([3, 17, 42, 9], [100, 7]), ([5, 6], [11, 12, 13])]
    ls = lora.LoraSettings(rank=4, alpha=8, targets=("gate", "down"), layers=(1, 2))
    model = load_model(tiny_llama)
    probs = trainer._final_probs(model, [trainer._precompute(model, make_batch(pairs), 1)], 1)
    threshold = float(probs.mean())  # one answer starts below it, the other above
    low = int(probs.argmin())
    outs = []
    for batch_pairs, pes in ((pairs, True), ([pairs[1 - low]], False)):
        m = load_model(tiny_llama)
        _train(m, batch_pairs, TrainSettings(objective="ga", lr=1e-2, steps=1, stop_prob=threshold,
                                             per_example_stop=pes, grad_clip=0), ls)
        outs.append(lora.adapter_state(m))
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], atol=1e-6), k


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_hold_done_keeps_a_finished_fact_s_column(tiny_llama, margin):
    """Keyed (A fixed, one column of B per fact): once a fact's answers are past the threshold (by the margin),
    its column stays as it is, step after step, while the other fact's column trains; without hold_done
    AdamW's momentum (and the other fact's gradient through A) moves it too."""
    ls = lora.LoraSettings(rank=2, alpha=2, targets=("down",), layers=(1, 2))
    base = load_model(tiny_llama)
    prompts = [[3, 17, 42, 9], [5, 6], [5, 6, 8]]
    with torch.no_grad():
        nxt = [base(torch.tensor([p]))[0, -1] for p in prompts]
    # fact 0 (column 0): its least likely token; fact 1 (sequences 1 and 2, column 1): their most likely ones
    pairs = [(prompts[0], [int(nxt[0].argmin())])] + [(p, [int(n.argmax())]) for p, n in zip(prompts[1:], nxt[1:])]
    probs = trainer._final_probs(base, [trainer._precompute(base, make_batch(pairs), 1)], 1)
    first, rest = float(probs[0]), float(probs[1:].min())
    assert first / margin < rest
    stop = (first / margin + rest) / 2  # fact 0 starts past the threshold by the margin, fact 1 above it
    columns = {}
    for hold in (True, False):
        model = load_model(tiny_llama)
        adapters = lora.attach(model, ls, seed=0)
        for a in adapters.values():
            a.lora_A.requires_grad_(False)
        seen = []
        settings = TrainSettings(objective="npo_tok", lr=1e-2, steps=4, stop_prob=stop, per_example_stop=True,
                                 hold_done=hold, hold_margin=margin)
        train(model, TrainData([make_batch(pairs)], columns=[[0, 1, 1]]), settings,
              RunOptions(progress=False, on_step=lambda s: seen.append(
                  [a.lora_B.detach().clone() for a in adapters.values()])))
        columns[hold] = seen
    assert len(columns[True]) >= 2
    for step in columns[True]:
        for b in step:
            assert torch.equal(b[:, 0], torch.zeros_like(b[:, 0]))  # never moved from B = 0
    assert any(b[:, 1].abs().max() > 0 for b in columns[True][-1])
    assert any(b[:, 0].abs().max() > 0 for b in columns[False][-1])


def _saved_bytes_peak():
    """A saved_tensors_hooks context and a dict whose "peak" is the most bytes autograd held saved at once."""
    count = {"live": 0, "peak": 0}

    class Saved:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            count["live"] += self.n
            count["peak"] = max(count["peak"], count["live"])

        def __del__(self):
            count["live"] -= self.n

    return torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t), count


@pytest.mark.parametrize("objective", ["npo_tok", "ga"])
def test_micro_batches_train_as_one_batch_holding_one_micro_batch_s_activations(tiny_llama, objective):
    """A forget set split into micro-batches takes the same steps as one batch (each micro-batch's backward runs
    after its own forward, the gradients divided by the whole set's count), with the retain term added, while
    autograd holds one micro-batch's activations at a time, not the set's."""
    pairs = [([3 + i, 17, 42 + i, 9], [100 + i, 7]) for i in range(8)]
    settings = TrainSettings(lr=5e-3, steps=4, stop_prob=1e-9, objective=objective, per_example_stop=True)
    got, peaks = {}, {}
    for split in (1, 4):
        model = load_model(tiny_llama)
        lora.attach(model, LS, seed=0)
        batches = [make_batch(pairs[i::split]) for i in range(split)]
        hooks, count = _saved_bytes_peak()
        with hooks:
            out = train(model, TrainData(batches, retain=make_batch([([5, 6, 7], [8, 9])])), settings,
                        RunOptions(progress=False))
        assert out.steps == 4
        got[split], peaks[split] = lora.adapter_state(model), count["peak"]
    for k, v in got[1].items():
        assert torch.allclose(got[4][k], v, rtol=1e-4, atol=1e-6), k
    assert peaks[4] < 0.5 * peaks[1], peaks
