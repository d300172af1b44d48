"""The thin trainer: precompute once, then adapter-only optimiser steps until the forget criterion holds.

    1. the caller attaches the adapters (lune_fast.lora.attach: A random, B zero, so the adapted model starts as
       the base; or lune_fast.keyed: A fixed, only B trains) and, under FSDP, shards the blocks;
    2. precompute, when the first adapted layer L0 is above 0, the hidden states entering L0 — layers below L0
       never run again — and for NPO the reference answer log-probs: read off the first step's forward where
       the trainable adapters write nothing yet (B = 0), else with every adapter off;
    3. each step: layers L0.. with adapters -> final norm at answer positions only -> fused head log-prob ->
       objective (+ retain term, + key-preservation penalty) -> backward (per micro-batch) -> clip -> optimiser
       step on the adapter parameters;
    4. stop when every answer's mean token probability is below `stop_prob` (suppress) or above
       `replace_prob` (replace), read off the step's own forward, or at `steps`.

A non-finite loss restores the adapter of the last good step and raises TrainingDiverged. Checkpoints are
safetensors + JSON (never pickle), written atomically; Ctrl-C writes one and raises TrainingInterrupted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import lora
from .checkpoints import load_checkpoint, save_checkpoint
from .data import Batch
from .distributed import Dist, reshard_blocks
from .losses import REFERENCE_OBJECTIVES, forget_loss, per_sequence, retain_kl, retain_nll, target_logprobs
from .model import AttnMask, Transformer
from .optim import Schedule, make_optimizer


@dataclass
class TrainSettings:
    objective: str = "npo"
    replace: bool = False  # replace mode: train towards the answers, stop when they are likely
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | column | settle (lune_fast.optim)
    steps: int = 60
    beta: float | None = None
    stop_prob: float = 0.05  # suppress: every answer's mean token probability below this
    replace_prob: float = 0.9  # replace: every replacement's mean token probability above this
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    seed: int = 0
    per_example_stop: bool = False  # an answer already past the threshold stops contributing gradient
    retain_weight: float = 1.0
    retain_loss: str = "nll"  # nll | kl
    preserve_weight: float = 0.0  # key preservation (lune_fast.preserve): weight of the relative output change
    checkpoint_every: int = 0
    # the run stops only once the first len(retain_keep) retain pairs are kept too, pair i with its answer ahead
    # of every other token by retain_keep[i] nats (answer_margins): the neighbour guard's round (lune_fast.guard)
    retain_keep: tuple[float, ...] = ()
    # keyed adapters (TrainData.columns): a fact whose answers are all past the threshold keeps its column of B
    # as it is in that step; AdamW's momentum would carry it on for ~1/(1 - beta1) = 10 more steps' worth
    hold_done: bool = False
    # with hold_done, an answer stops training (and its column is held) only once it is this factor past the
    # threshold (suppress: below stop_prob × margin; replace: 1 - replace_prob below 1 by margin): a fact held
    # right at the threshold is pushed back over it by the others' steps and trains again, step after step
    hold_margin: float = 1.0


@dataclass
class TrainOutcome:
    steps: int
    stopped: str  # criterion | max_steps
    seconds: float
    tokens: int
    final_mean_prob: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    def then(self, more: "TrainOutcome") -> "TrainOutcome":
        """This run followed by `more`, a continuation of it on the same adapter."""
        return TrainOutcome(self.steps + more.steps, more.stopped, self.seconds + more.seconds,
                            self.tokens + more.tokens, more.final_mean_prob or self.final_mean_prob,
                            self.losses + more.losses, self.step_seconds + more.step_seconds)


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, lr: float):
        self.step = step
        super().__init__(f"the loss became NaN/inf at step {step}; the adapter of step {step - 1} was kept. "
                         f"Lower the learning rate (now --lr {lr:g}) or the number of targets/rank.")


class TrainingInterrupted(KeyboardInterrupt):
    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"a checkpoint of step {step} is in {checkpoint}; rerun the same command with --resume" \
            if checkpoint else "no checkpoint was kept (no output folder)"
        super().__init__(f"interrupted at step {step}: {where}")


@dataclass
class TrainData:
    """What a run trains on: this process's micro-batches of the forget set (under torchrun, its share), the
    retain batch (anchors and the user's retain facts, kept by the retain term; whole on every rank), and the
    preserved-input moments (lune_fast.preserve.Preserved) for settings.preserve_weight > 0."""
    batches: list[Batch]
    retain: Batch | None = None
    preserved: object = None
    columns: list[list[int]] | None = None  # per batch, per sequence: the column of B it trains alone (keyed)


@dataclass
class RunOptions:
    """How a run is carried out, not what it computes."""
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    on_step: Callable[[int], None] | None = None
    dist: Dist | None = None


@dataclass
class _Part:
    """One micro-batch with its cached prefix hidden states and reference log-probs."""
    batch: Batch
    h0: torch.Tensor
    ref_tok: torch.Tensor  # the frozen model's log-prob of each answer token
    positions: torch.Tensor
    mask: AttnMask
    source: int = 0  # which of the original micro-batches its sequences come from
    origin: list[int] | None = None  # their indices there


def train(model: Transformer, data: TrainData, settings: TrainSettings, run: RunOptions | None = None
          ) -> TrainOutcome:
    """Train the adapters attached to `model` (model.lora_settings) on `data` until the criterion or
    settings.steps."""
    run = run or RunOptions()
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    dist = run.dist
    if dist is not None and dist.fsdp:
        reshard_blocks(model)
    params = lora.trainable_parameters(model)
    L0 = min(model.lora_settings.layers) if model.lora_settings.layers else 0

    # 2. precompute once: the prefix below the first adapted layer (no adapter acts there)
    parts = [_precompute(model, b, L0, source=i) for i, b in enumerate(data.batches)]
    retain = _Retain.of(model, data.retain, L0, settings)
    preserved = data.preserved if settings.preserve_weight > 0 else None
    step_terms = _StepTerms(model, params, settings, dist, retain, preserved, L0)

    opt = make_optimizer(settings.optimizer, params, settings.lr, settings.weight_decay)
    sched = Schedule(opt, _schedule(settings))
    start, work_spec, references = 0, None, None
    if run.resume and run.checkpoint_dir is not None and (run.checkpoint_dir / "state.json").exists():
        start, work_spec, references = load_checkpoint(run.checkpoint_dir, model, opt, sched, settings)
    # the objectives with a reference (NPO) compare with the model as the run found it: where its trainable
    # adapters write nothing yet (B = 0, a request's first training) the first step's own forward gives it (a
    # lifelong state's earlier ranks acting), one whole forward fewer; else every adapter off; a resumed run
    # takes the one its checkpoint kept. Under data parallel one rank writes the checkpoint of all, and each rank
    # has its own sequences: there the reference is every adapter off, taken again on resume
    uses_reference = _uses_reference(settings)
    from_first_forward = uses_reference and (dist is None or run.checkpoint_dir is None)
    if uses_reference:
        if from_first_forward and references is not None:
            for part, ref in zip(parts, references):
                part.ref_tok = ref.to(model.device)
        elif not (from_first_forward and _at_rest(model)):  # else _forward takes it at the first step
            for part in parts:
                part.ref_tok = _reference(model, part, L0)
    last_good = [p.detach().clone() for p in params]

    bar = None
    if run.progress and (dist is None or dist.is_main):
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start, desc="unlearning", unit="step", leave=False)
    outcome = TrainOutcome(steps=start, stopped="max_steps", seconds=0.0,
                           tokens=sum(p.batch.n_tokens for p in parts) * start)
    # With per-example stopping, each step runs only the answers still to be forgotten (`work`); finished ones
    # leave the batch, and everything is checked again before the run may stop.
    shrinking = settings.per_example_stop and not (dist is not None and dist.fsdp)  # FSDP: same forwards on all ranks
    # Several micro-batches: each one's backward runs right after its forward, so that a step holds one
    # micro-batch's activations (what limits.check_memory counts), not the whole forget set's. Sharded blocks
    # gather their weights per forward and scatter gradients per backward: FSDP keeps one backward a step.
    stream = len(parts) > 1 and not (dist is not None and dist.fsdp)
    work = parts if work_spec is None else _rebuild(model, parts, work_spec, L0)
    # Every iteration ends the run or takes one optimizer step, so the loop runs at most settings.steps times.
    # The stop decision is read from one set of probabilities: the step's own forward when it covered the whole
    # forget set, else one re-check on the whole set (at most once per step). When that re-check finds answers
    # the working subset called done (a packed subset and the whole set round differently in bf16), those
    # answers are trained in this same step, whatever the subset's forward said.
    with _InterruptFlag() as interrupt:
        try:
            step = start
            while step < settings.steps:
                t_step = time.perf_counter()
                # 3. forward the micro-batches; the stop check reads the same log-probs
                losses, probs, weights = _forward(model, work, L0, settings, backward=stream)
                # 4. stop on the criterion (every rank alike), before any update of this step
                if _all_done(probs, settings, dist, model.device) and step_terms.retain_kept():
                    whole = work is parts
                    if _everywhere(whole, dist, model.device):
                        outcome.stopped = "criterion"
                        break
                    probs = probs if whole else _final_probs(model, parts, L0)
                    if _all_done(probs, settings, dist, model.device):
                        outcome.stopped = "criterion"
                        break
                    work = _still_to_do(model, parts, probs, settings, L0)
                    opt.zero_grad(set_to_none=True)
                    losses, _, weights = _forward(model, work, L0, settings, train_all=True, backward=stream)
                count = step_terms.active(weights)
                if stream:  # the micro-batches' sums were backpropagated already: their mean's gradient
                    _divide_grads(params, count)
                loss = step_terms.loss(losses, count)
                if not _finite(loss, dist, model.device):
                    copy_into(last_good, params)
                    raise TrainingDiverged(step + 1, settings.lr)  # 1-based: the step that failed
                if loss.requires_grad:  # streamed with no retain or preservation term: the gradients are in
                    loss.backward()
                if dist is not None:
                    dist.reduce_grads(params)
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if settings.hold_done and data.columns is not None:
                    _hold_columns(params, last_good, _active_columns(work, weights, data.columns, params, dist))
                copy_into(params, last_good)
                step += 1
                outcome.losses.append(loss.item())
                outcome.step_seconds.append(time.perf_counter() - t_step)
                outcome.steps = step
                outcome.tokens += sum(p.batch.n_tokens for p in work)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{outcome.losses[-1]:.3f}", training=sum(p.batch.n_seq for p in work))
                if shrinking:
                    work = _shrink(model, parts, work, weights, L0)
                if run.on_step is not None:
                    run.on_step(step)
                every = settings.checkpoint_every
                if run.checkpoint_dir is not None and (dist is None or dist.is_main) and \
                        (interrupt.requested or (every and step % every == 0)):
                    # rank 0 writes the checkpoint of all: its sequences still to train are its own, so under
                    # data parallel none are kept (a resumed run starts from the whole set, and the finished
                    # answers drop out again at its first step)
                    save_checkpoint(run.checkpoint_dir, step, model, opt, sched, settings,
                                    [[p.source, p.origin] for p in work] if dist is None else None,
                                    [p.ref_tok for p in parts] if from_first_forward else None)
                if interrupt.requested:
                    raise TrainingInterrupted(step, run.checkpoint_dir)
            if outcome.stopped != "criterion":
                probs = _final_probs(model, parts, L0)
        finally:
            opt.zero_grad(set_to_none=True)  # a streamed last step's, or a failed one's
            if bar is not None:
                bar.close()
    outcome.final_mean_prob = [float(x) for x in probs]
    if dist is not None:  # every rank's share
        outcome.tokens = int(dist.sum_(torch.tensor([outcome.tokens], device=model.device)).item())
    outcome.seconds = time.perf_counter() - t_start
    return outcome


def _forward(model, work: list[_Part], L0: int, settings: TrainSettings, train_all: bool = False,
             backward: bool = False):
    """Per micro-batch: the objective summed over its sequences (weight 0 for an answer already past the
    threshold, with per-example stopping, unless train_all), the sequences' mean token probabilities, and those
    weights. backward: each micro-batch's sum is backpropagated at once (and returned detached), so its
    activations are freed before the next one's forward; _StepTerms.loss divides the gradients."""
    losses, probs, weights = [], [], []
    for part in work:
        tok = target_logprobs(_hidden_at_answers(model, part, L0), model.head_weight, part.batch.targets)
        if part.ref_tok is None and _uses_reference(settings):  # the run's first forward, adapters at rest
            part.ref_tok = tok.detach().clone()
        p = _mean_token_prob(tok, part.batch)
        w = (~_done(p, settings, settings.hold_margin if settings.hold_done else 1.0)).float() \
            if settings.per_example_stop and not train_all else torch.ones_like(p)
        loss = forget_loss("replace" if settings.replace else settings.objective, tok, part.batch.seq,
                           part.batch.n_seq, part.ref_tok, weights=w, beta=settings.beta, reduction="sum")
        if backward:
            loss.backward()
            loss = loss.detach()
        losses.append(loss)
        probs.append(p)
        weights.append(w)
    return losses, (torch.cat(probs) if probs else torch.zeros(0)), weights


def _active_columns(work: list[_Part], weights: list[torch.Tensor], columns: list[list[int]], params, dist
                    ) -> torch.Tensor:
    """bool [rank]: the columns of B that some sequence this step trained (on any rank) owns."""
    active = torch.zeros(params[0].shape[1], device=params[0].device)
    for part, w in zip(work, weights):
        own = torch.tensor([columns[part.source][i] for i in part.origin], device=active.device)
        active.index_add_(0, own, w.to(active.device))
    return (active if dist is None else dist.sum_(active)) > 0


@torch.no_grad()
def _hold_columns(params: list[torch.Tensor], before: list[torch.Tensor], active: torch.Tensor) -> None:
    """Put back the columns of B that no sequence trained this step (params: a keyed adapter's B's [out, rank])."""
    for p, b in zip(params, before):
        p[:, ~active] = b[:, ~active]


def _done(probs: torch.Tensor, settings: TrainSettings, margin: float = 1.0) -> torch.Tensor:
    return probs > 1 - (1 - settings.replace_prob) * margin if settings.replace else probs < settings.stop_prob * margin


def _all_done(probs, settings, dist, device) -> bool:
    return _everywhere(bool(_done(probs, settings).all()), dist, device)


def _everywhere(flag: bool, dist, device) -> bool:
    return flag if dist is None else dist.all_true(flag, device)


def _finite(loss, dist, device) -> bool:
    return _everywhere(bool(torch.isfinite(loss)), dist, device)


@dataclass
class _Retain:
    """The retain batch's cached prefix, and with the KL retain term its reference log-softmax."""
    part: _Part
    ref: torch.Tensor | None

    @classmethod
    def of(cls, model, batch: Batch | None, L0: int, settings: TrainSettings) -> "_Retain | None":
        if batch is None:
            return None
        part = _precompute(model, batch, L0)
        ref = None
        if settings.retain_loss == "kl":
            with torch.no_grad():
                ref = torch.log_softmax(_hidden_at_answers(model, part, L0).float() @ model.head_weight.float().t(), -1)
        return cls(part, ref)


@dataclass
class _StepTerms:
    """Everything a step's loss is made of besides the forget micro-batches' own terms."""
    model: Transformer
    params: list[torch.Tensor]
    settings: TrainSettings
    dist: Dist | None
    retain: _Retain | None
    preserved: object
    L0: int

    def active(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """How many sequences are still being trained, over every micro-batch and rank (at least 1)."""
        active = torch.stack([w.sum() for w in weights]).sum() if weights else torch.zeros((), device=self.model.device)
        return (active if self.dist is None else self.dist.sum_(active.clone())).clamp_min(1)

    def loss(self, losses: list[torch.Tensor], count: torch.Tensor) -> torch.Tensor:
        """The mean objective over the `count` sequences still being trained (active()), plus the retain and
        key-preservation terms."""
        model, s, dist = self.model, self.settings, self.dist
        if losses:
            loss = torch.stack(losses).sum() / count
        else:  # this rank has nothing left to train: a zero loss keeps it in step with the others
            loss = sum(p.sum() for p in self.params) * 0.0
        share = 1.0 if dist is None else 1.0 / dist.world  # every rank holds the whole retain set (and moments)
        if self.retain is not None:
            loss = loss + share * s.retain_weight * self._retain_term()
        if self.preserved is not None:
            loss = loss + share * s.preserve_weight * self.preserved.penalty(model)
        if dist is not None and dist.fsdp:
            loss = loss * dist.world  # FSDP averages the reduce-scatter; the loss is already global
        return loss

    @torch.no_grad()
    def retain_kept(self) -> bool:
        """Are the first len(settings.retain_keep) retain pairs kept by their margins (True when nothing is
        asked)? The retain batch is whole on every rank, so every rank answers alike."""
        need = self.settings.retain_keep
        if not need or self.retain is None:
            return True
        part = self.retain.part
        b = part.batch
        m = answer_margins(self.model.logits(_hidden_at_answers(self.model, part, self.L0)), b.targets, b.seq,
                           b.n_seq)[:len(need)]
        return bool((m >= torch.tensor(need, device=m.device)).all())

    def _retain_term(self) -> torch.Tensor:
        model = self.model
        h = _hidden_at_answers(model, self.retain.part, self.L0)
        if self.settings.retain_loss == "kl":
            return retain_kl(h @ model.head_weight.t(), self.retain.ref)
        return retain_nll(target_logprobs(h, model.head_weight, self.retain.part.batch.targets))


@torch.no_grad()
def _divide_grads(params: list[torch.Tensor], count: torch.Tensor) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.div_(count)


# A smaller batch pays for its rebuild (one forward of the remaining sequences) once this many have finished.
SHRINK_FRACTION = 0.25


def _shrink(model, parts, work: list[_Part], weights: list[torch.Tensor], L0: int) -> list[_Part]:
    """Drop the finished sequences from the micro-batches once enough of them have finished."""
    total = sum(p.batch.n_seq for p in work)
    active = int(sum(int(w.sum()) for w in weights))
    if total == 0 or total - active < SHRINK_FRACTION * total:
        return work
    spec = [[p.source, [p.origin[i] for i, x in enumerate(w.tolist()) if x > 0]] for p, w in zip(work, weights)]
    return _rebuild(model, parts, spec, L0)


def _still_to_do(model, parts: list[_Part], probs: torch.Tensor, settings, L0: int) -> list[_Part]:
    """The micro-batches rebuilt from the sequences that are (again) above the threshold."""
    spec, offset = [], 0
    for i, part in enumerate(parts):
        n = part.batch.n_seq
        spec.append([i, [j for j, d in enumerate(_done(probs[offset:offset + n], settings).tolist())
                         if not d]])
        offset += n
    return _rebuild(model, parts, spec, L0)


def _rebuild(model, parts: list[_Part], spec: list, L0: int) -> list[_Part]:
    """Micro-batches of the given sequences [[source part, [indices]], ...], packed anew; their reference
    log-probs are taken from the source parts, not recomputed."""
    out = []
    for src, idx in spec:
        if idx:
            sub = parts[src].batch.subset(idx)
            out.append(_precompute(model, sub, L0, source=src, origin=list(idx), ref_tok=_ref_of(parts[src], idx, sub)))
    return out


def _ref_of(part: _Part, keep: list[int], sub: Batch) -> torch.Tensor | None:
    """The reference log-probs of sequences `keep` of a part, in the token order of `sub`, its repacked subset
    (a sequence's tokens stay contiguous and in order whatever the packing); None where the part has none."""
    if part.ref_tok is None:
        return None
    per_seq = [part.ref_tok[part.batch.seq.to(part.ref_tok.device) == i] for i in keep]
    out = torch.empty(sub.targets.shape[0], dtype=part.ref_tok.dtype, device=part.ref_tok.device)
    seq = sub.seq.to(out.device)
    for j, ref in enumerate(per_seq):
        out[seq == j] = ref
    return out


class _InterruptFlag:
    """Ctrl-C during training asks for a stop at the end of the current step (so the checkpoint is exactly
    a completed step); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


@torch.no_grad()
def copy_into(src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    for a, b in zip(src, dst):
        b.copy_(a)


# -- pieces of a step ----------------------------------------------------------------------------------------
@torch.no_grad()
def _precompute(model: Transformer, batch: Batch, L0: int, source: int = 0, origin: list[int] | None = None,
                ref_tok: torch.Tensor | None = None) -> _Part:
    """A micro-batch with its hidden states below layer L0 (they do not change: no adapter acts there)."""
    batch = batch.to(model.device)
    positions, mask = batch.layout()
    h0 = model.embed(batch.input_ids)
    if L0 > 0:
        h0 = model.run_layers(h0, positions, mask, start=0, end=L0)
    return _Part(batch, h0, ref_tok, positions, mask, source, list(range(batch.n_seq)) if origin is None else origin)


@torch.no_grad()
def _reference(model: Transformer, part: _Part, L0: int) -> torch.Tensor:
    """The part's answer tokens' log-probs with every adapter off."""
    with lora.disabled(model):
        return target_logprobs(_hidden_at_answers(model, part, L0), model.head_weight, part.batch.targets)


def _uses_reference(settings: TrainSettings) -> bool:
    return not settings.replace and settings.objective in REFERENCE_OBJECTIVES


def _at_rest(model: Transformer) -> bool:
    """Do the trainable adapters write nothing yet (every trainable B zero: the model is as it was before them)?"""
    trained = [m for m in lora.adapters_of(model).values() if m.lora_B.requires_grad]
    return bool(trained) and not any(bool(m.lora_B.detach().any()) for m in trained)


def _hidden_at_answers(model: Transformer, part: _Part, L0: int) -> torch.Tensor:
    """Final-norm hidden states at the positions that predict answer tokens [n_answer_tokens, H]."""
    H = part.h0.shape[-1]
    h = model.run_layers(part.h0, part.positions, part.mask, start=L0)
    return model.norm(h.reshape(-1, H)[part.batch.sel])


def answer_margins(logits: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per sequence [n_seq]: the smallest lead, over its answer tokens (`logits` at the positions that predict
    them: Transformer.logits, the head's packed product), of the answer token's log-probability over the most
    likely other token. Positive: greedy decoding says the answer (when it comes first); negative: some token is
    more likely."""
    logits = logits.float()
    target = logits.gather(-1, targets[:, None])[:, 0]
    gap = target - logits.scatter(-1, targets[:, None], float("-inf")).max(-1).values
    out = torch.full((n_seq,), float("inf"), device=gap.device)
    return out.scatter_reduce(0, seq.to(gap.device), gap, reduce="amin")


def _mean_token_prob(tok_logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    sums, counts = per_sequence(tok_logp.detach().exp(), batch.seq, batch.n_seq)
    return sums / counts


@torch.no_grad()
def _final_probs(model, parts, L0) -> torch.Tensor:
    return torch.cat([_mean_token_prob(target_logprobs(_hidden_at_answers(model, p, L0), model.head_weight,
                                                       p.batch.targets), p.batch) for p in parts])


def _schedule(s: TrainSettings):
    def factor(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.schedule == "cosine":
            span = max(1, s.steps - s.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s.warmup_steps) / span)))
        return 1.0
    return factor


def train_keeping_last_good(model: Transformer, data: TrainData, settings: TrainSettings,
                            run: RunOptions | None = None) -> tuple[TrainOutcome, str | None]:
    """train(), but a run that diverges returns its outcome so far (the adapter is the last good step's) and
    the message, instead of raising."""
    try:
        return train(model, data, settings, run), None
    except TrainingDiverged as e:
        return TrainOutcome(steps=e.step - 1, stopped="diverged", seconds=0.0, tokens=0), str(e)
