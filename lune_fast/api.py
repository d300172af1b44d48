"""The drop-in API: keep a model loaded, turn deletion requests into adapters.

    u = Unlearner("default")                     # loads once
    result = u.forget("facts.jsonl")             # or a list of dicts; mode="replace" for edits
    result.save("out/")                          # PEFT adapter + report.json + report.md

    u.forget("more.jsonl", into="state/")        # a lifelong state: one adapter for every request so far
    u.revoke("state/", "r0001")                  # that request's facts come back; the others stay forgotten
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import distributed, lifelong, lora, plan, recall, repair
from .anchors import build_anchors
from .assets import asset
from .data import DataError, Encoder, ReadResult, read_facts, read_lines
from .evaluate import (PromptRow, counted, evaluate, first_line, metrics_table, prompt_rows,
                       report_markdown)
from .guard import Guard, guard_round
from .io import atomic_output_dir
from .keyed import attach_keyed, preserved_inputs, step_scale, subject_groups
from .optim import COLUMN_STEPS
from .preserve import Preserved
from .progress import shown
from .settings import Settings, SettingsError, check_dtypes, resolve_dtype, train_settings
from .state import State
from .trainer import RunOptions, train_keeping_last_good
from .twin import StreamedTwin
from .weights import folder_identity, load_model, load_tokenizer, resolve_model_dir, safetensors_files


@dataclass
class ForgetResult:
    adapter: dict[str, torch.Tensor]
    adapter_config: dict
    before: dict | None
    after: dict | None
    cost: dict
    config: dict
    model: str
    skipped: list[str] = field(default_factory=list)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    stopped: str = ""
    error: str | None = None  # set when training diverged (the adapter is the last good step's)
    anchors: list[str] = field(default_factory=list)
    evaluation_before: object = field(default=None, repr=False)
    evaluation_after: object = field(default=None, repr=False)
    outcome: object = field(default=None, repr=False)  # the trainer's TrainOutcome (per-step times, losses)
    request_id: str | None = None  # with forget(into=...): the ledger id of this request
    # the forget prompts still answered with the target (suppress) or not yet with the replacement (replace)
    still_known: list[str] = field(default_factory=list)
    facts: list = field(default_factory=list, repr=False)  # the facts trained (after skipping)
    keys: dict | None = field(default=None, repr=False)  # a keyed adapter's subject keys
    # into a state: the listed neighbours' leads before training, where under ln 2 (lune_fast.repair.watched)
    watch: dict = field(default_factory=dict, repr=False)

    def report(self) -> dict:
        return {"model": self.model, "config": self.config, "before": self.before, "after": self.after,
                "cost": self.cost, "stopped": self.stopped, "error": self.error, "skipped_records": self.skipped,
                "still_known": self.still_known, "request_id": self.request_id}

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Adapter (PEFT format) + report.json + report.md, written to a temporary folder and renamed."""
        out = Path(out)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            lora.save_adapter(tmp, self.adapter, self.adapter_config)
            (tmp / "report.json").write_text(json.dumps(self.report(), indent=2) + "\n")
            (tmp / "report.md").write_text(report_markdown(self.model, self.config, self.before or {},
                                                           self.after or {}, self.cost, self.rows()))
        return out

    def rows(self) -> list[PromptRow]:
        """Every evaluated prompt's answer before -> after, leaks and flipped neighbours marked."""
        if self.evaluation_after is None:
            return []
        return prompt_rows(self.evaluation_before, self.evaluation_after, self.config.get("mode") == "replace")

    def table(self) -> str:
        return metrics_table(self.before or {}, self.after or {}, counted(self.evaluation_before))

    def attach_to(self, model) -> None:
        """Put this adapter on `model` the way a saved one is loaded (PEFT files, validated), e.g. to evaluate
        or attack it on another copy of the model."""
        with tempfile.TemporaryDirectory() as tmp:
            lora.load_adapter(model, self.save(Path(tmp) / "adapter"))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


class Unlearner:
    """Holds a frozen model and its tokenizer; each forget() trains a fresh adapter and leaves the model as
    it was. Calls from several threads take turns (one lock): the model is shared, and an adapter is on it
    while a call runs."""

    def __init__(self, model: str = "default", dtype: str | torch.dtype = "auto", device: str = "cpu",
                 fsdp: bool = False, backend: str = "auto", **defaults):
        """Under torchrun the forget set is split across the ranks (data parallel); fsdp=True also shards the
        frozen blocks (FSDP2). Every rank runs the same calls; rank 0 writes. backend: the LoRA op's
        (auto = torch, the addmm chain, on every device; triton = the fused kernels, CUDA only)."""
        self.model_name = str(model)
        self.device = torch.device(device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.dist = distributed.from_env(fsdp, self.device)
        self.fsdp = self.dist is not None and self.dist.fsdp
        self.dtype = resolve_dtype(dtype, self.device)
        self.backend = backend
        self.model_dir = resolve_model_dir(model)
        # under FSDP each rank reads only the row chunks of the block weights that it will keep
        rows_of = (self.dist.rank, self.dist.world) if self.fsdp else None
        self.model = load_model(self.model_dir, dtype=self.dtype, device=self.device, rows_of=rows_of)
        self._sharded = False
        self.tokenizer = load_tokenizer(self.model_dir)
        self.encoder = Encoder(self.tokenizer)
        self.defaults = replace(Settings(), **defaults)
        self._base_evals: dict[str, object] = {}
        self._text_moments: dict[tuple, tuple] = {}
        self._base_leads: dict[tuple[str, str], float] = {}  # listed neighbours' leads on the base model
        # what the preserved text's moments are computed from, for keeping them on disk (one process: under
        # torchrun each rank's model may be a shard)
        self._origin = None if self.dist is not None else \
            repr((folder_identity(self.model_dir), str(self.dtype), self.device.type))
        self._lock = threading.RLock()
        self._twins: dict[torch.dtype, StreamedTwin] = {}  # the model in other dtypes, for the recall rounds

    def checked_in(self, s: Settings) -> list[torch.dtype]:
        """The dtypes the recall rounds ask the model in besides its own (Settings.check_dtypes; none under FSDP,
        whose blocks are sharded, nor without recall rounds)."""
        if self.fsdp or s.mode != "suppress" or s.recall_rounds == 0:
            return []
        return check_dtypes(s, self.dtype)

    def twins(self, s: Settings) -> dict[str, StreamedTwin]:
        """The model as loaded in each of checked_in(s), read from its files a layer at a time when asked
        (lune_fast.twin: no second copy of the weights stays in memory), with this model's adapter."""
        out = {}
        for d in self.checked_in(s):
            if d not in self._twins:
                self._twins[d] = StreamedTwin(safetensors_files(self.model_dir), d, self.model)
            out[str(d).replace("torch.", "")] = self._twins[d]
        return out

    # -- the one call ----------------------------------------------------------------------------------------
    def forget(self, records, mode: str | None = None, retain=None, evaluate_before: bool = True,
               evaluate_after: bool = True, retain_texts: list[str] | str | None = None, progress: bool = True,
               checkpoint_dir: Path | None = None, resume: bool = False, into: str | Path | None = None,
               **overrides) -> ForgetResult:
        """Train an adapter that forgets (suppress) or replaces the records' answers; see Settings for the
        overrides. The model is left as it was; the adapter and the before/after METRICS are in the result.

        into: a lifelong state folder (lune_fast.state; created the first time). The request is trained with
        the state's earlier requests acting, its keyed ranks fitted not to read their subjects, and added to
        the state with a ledger line (result.request_id); `after` is the whole state's. A run that diverges
        leaves the state as it was."""
        read = read_facts(records)
        if into is not None:
            return lifelong.forget_into(self, read, into, mode, retain, evaluate_before, evaluate_after,
                                        retain_texts, progress, overrides)
        with self._lock:
            return self.run_request(read, mode, retain, evaluate_before, evaluate_after, retain_texts, progress,
                                    checkpoint_dir, resume, None, overrides)

    def run_request(self, read: ReadResult, mode, retain, evaluate_before, evaluate_after, retain_texts, progress,
                    checkpoint_dir, resume, st: State | None, overrides: dict) -> ForgetResult:
        """One request: plan, train, result (with a lifelong state `st`: its earlier requests acting; committing
        it is lune_fast.lifelong's). The caller holds the lock."""
        with shown(progress):
            return self._forget(read, mode, retain, evaluate_before, evaluate_after, retain_texts, progress,
                                checkpoint_dir, resume, st, overrides)

    def _forget(self, read: ReadResult, mode, retain, evaluate_before, evaluate_after, retain_texts, progress,
                checkpoint_dir, resume, st: State | None, overrides: dict) -> ForgetResult:
        s = self._settings(mode, overrides, chat=all(f.chat for f in read.facts), lifelong=st is not None)
        texts = self.retain_texts(retain_texts)
        t0 = time.perf_counter()
        skipped = list(read.skipped)
        facts = read.facts
        if evaluate_before and s.mode == "suppress" and not s.train_unknown:
            plan.answers(self.encoder, facts, s, self.model, [])  # the cheap refusals (the context) come first
            facts = self._known(facts, texts, s, progress, skipped)
        if progress:
            for line in skipped:
                print(f"lune-fast: skipped {line}", file=sys.stderr)
        # 1. the plan: what to train (refusing what cannot fit before any work), where the adapter goes
        job = self._plan(facts, skipped, s, retain)
        if st is not None:  # the state's layer window with room for the request
            job.layout = replace(job.layout, layers=self._check_state(st, job))
        before = self.base_evaluation(job.facts, texts, s.mode == "replace", s.max_new_tokens, progress) \
            if evaluate_before else None
        run = RunOptions(checkpoint_dir=None if self.fsdp else checkpoint_dir, resume=resume, progress=progress,
                         dist=self.dist)  # sharded optimiser state: checkpoints are a data-parallel feature
        # 2. the adapter, training (a diverged run keeps its last good adapter), the recall rounds; evaluate
        t_train = time.perf_counter()
        hold_off, leave_off = self._subjects(job, st)
        # a state's ranks in other layer windows act too, folded into the frozen weights until the request ends;
        # the preserved inputs are read with all of them acting, whatever the request leaves off, so that one
        # window's text moments serve every request into it
        earlier = st.earlier_facts() if st is not None else []
        with ExitStack() as folds:
            preserved = self._preserved(job, earlier, folds.enter_context(self._folded(st, job.layout)),
                                        lifelong=st is not None)
            if leave_off:  # trained and checked with those left off
                folds.close()
                folds.enter_context(self._folded(st, job.layout, leave_off))
            try:
                asked = replace(self.defaults, **overrides)
                rounds, keys, guarded, watch = self._train(job, run, st, earlier, preserved,
                                                           scale_lr=asked.lr is None,
                                                           own_optimizer=asked.optimizer is None,
                                                           hold_off=hold_off, leave_off=leave_off)
                train_seconds = time.perf_counter() - t_train
                after = evaluate(self.model, self.encoder, job.facts, texts, s.mode == "replace", s.max_new_tokens,
                                 progress, self.dist) if evaluate_after else None
                state = distributed.adapter_state(self.model)
                trained = sum(p.numel() for p in lora.trainable_parameters(self.model))
            finally:
                if not self.fsdp:  # a sharded model stays as it is: one request per process under FSDP
                    lora.detach(self.model)
        # 3. the result: adapter, METRICS (paraphrases/neighbours on what the base model answered), cost
        cost = {"train_seconds": round(train_seconds, 3), "steps": rounds.outcome.steps,
                "train_tokens": rounds.outcome.tokens, "recall_rounds": rounds.rounds,
                "peak_memory_mb": round(_peak_memory_mb(self.device), 1), "trainable_params": trained,
                "device": str(self.device), "total_seconds": round(time.perf_counter() - t0, 3)}
        if guarded is not None:
            cost["neighbor_guard"] = guarded
        result = self._result(job, skipped, before, after, rounds, state, cost)
        result.keys, result.watch = keys, watch
        return result

    def _known(self, facts, texts: list[str], s: Settings, progress: bool, skipped: list[str]) -> list:
        """The facts the base model answers with their target (the "before" evaluation's forget prompts, which
        the report needs anyway); the others are named in `skipped`. None known is an error: nothing to do."""
        base = self.base_evaluation(facts, texts, False, s.max_new_tokens, progress)
        said = dict(zip([p.prompt for p in base.probes if p.kind == "forget"], base.generations))
        hits = dict(zip([p.prompt for p in base.probes if p.kind == "forget"], base.hits))
        kept = [f for f in facts if hits[f.prompt]]
        unknown = [f"{f.source}: the model does not answer {f.target!r} here (it says "
                   f"{first_line(said[f.prompt])[:60]!r})" for f in facts if not hits[f.prompt]]
        if not kept:
            raise DataError(f"none of the {len(facts)} fact(s) is answered with its target by the model, nothing to "
                            f"forget (--train-unknown / train_unknown=True trains them anyway): " +
                            "; ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
        skipped += [f"{line}: nothing to forget (--train-unknown trains it anyway)" for line in unknown]
        return kept

    def _check_state(self, st: State, job: plan.Plan) -> tuple[int, ...]:
        room = min(m.in_features for m in lora.frozen_linears(self.model, job.layout).values()) // 2
        return st.check_request(job.layout, str(self.model_dir), self.model.config.num_hidden_layers,
                         job.settings.adapter == "keyed", room, len(job.facts))

    def revoke(self, into: str | Path, request_id: str, evaluate_after: bool = True,
               retain_texts: list[str] | str | None = None, progress: bool = False) -> dict:
        """Withdraw one request from a lifelong state: its facts come back, the others stay forgotten (the ledger
        line written: lune_fast.lifelong.revoke)."""
        return lifelong.revoke(self, into, request_id, evaluate_after, retain_texts, progress)

    def _plan(self, facts, skipped: list[str], s: Settings, retain) -> plan.Plan:
        """What to train and where: the facts kept, their pairs (with the model's own answers for
        negatives=self|both), the adapter layout (under FSDP also attached and sharded) and the retain pairs."""
        kept = plan.answers(self.encoder, facts, s, self.model, skipped)
        facts = [f for f, _ in kept]
        layout = plan.adapter_layout(self.model, self.encoder, facts, s)
        if self.fsdp:  # each rank holds only its row chunks: the model runs once its blocks are sharded
            self._attach_sharded(s, layout)
        own = recall.self_negatives(self.model, self.encoder, facts, s.max_new_tokens, self.dist) \
            if s.mode == "suppress" and s.negatives != "gold" else None
        pairs, owners = plan.training_pairs(self.encoder, kept, s, own)
        if self.fsdp and len(pairs) < self.dist.world:  # every rank must run the same sharded forwards
            raise DataError(f"{len(pairs)} training example(s) for {self.dist.world} ranks: run on fewer processes")
        anchors = build_anchors(self.model, self.encoder, facts, s.anchors, s.anchor_candidates, s.anchor_min_prob,
                                s.seed) if s.anchors > 0 else []
        return plan.Plan(s, facts, pairs, owners, plan.retain_pairs(self.encoder, anchors, retain), layout,
                         self.encoder.pad_id, [a.prompt for a in anchors])

    def _subjects(self, job: plan.Plan, st: State | None) -> tuple[list[bool] | None, frozenset]:
        """Keyed: facts about one subject share a rank (job.columns). In a state, per earlier keyed fact whether
        the new ranks are held off its key (those of other subjects: the new rank has to read its own subject, and
        one fitted to read it and not read it at once would be large enough to read everything), and the earlier
        facts about this request's subjects, whose ranks are left off while it trains: a rank trained beside them
        could lean on them, and revoking them would then leave their facts still suppressed."""
        if job.settings.adapter != "keyed":
            return None, frozenset()
        before = st.earlier_facts(keyed=True) if st is not None else []
        groups = subject_groups(self.encoder, job.facts + before)
        n = len(job.facts)
        job.columns = groups[:n]
        if st is None:
            return None, frozenset()
        hold_off = [g >= n for g in groups[n:]]
        return hold_off, frozenset(i for i, held in zip(st.keyed_fact_ids(), hold_off) if not held)

    def _folded(self, st: State | None, layout, off: frozenset = frozenset()):
        """State.folded_outside on this model (nothing to fold without a state)."""
        return st.folded_outside(self.model, layout, off) if st is not None else nullcontext()

    def _preserved(self, job: plan.Plan, earlier: list, folded, lifelong: bool = False) -> Preserved | None:
        """The inputs a keyed adapter (or --preserve-weight) keeps: keyed.preserved_inputs, with a state's
        `earlier` facts' neighbours, its text's moments cached under what the state has `folded` into the frozen
        weights (State.folded_outside); `lifelong`: a request into a state (its neighbours' sums are kept for the
        next one)."""
        s = job.settings
        if s.adapter != "keyed" and s.preserve_weight <= 0:
            return None
        return preserved_inputs(self.model, self.encoder, job.facts, job.layout, s.preserve_prompts,
                                s.preserve_text, s.seed, self._text_moments, s.preserve_neighbors, earlier, folded,
                                self._origin, lifelong)

    def _train(self, job: plan.Plan, run: RunOptions, st: State | None, earlier: list,
               preserved: Preserved | None, scale_lr: bool = True, own_optimizer: bool = False,
               hold_off: list[bool] | None = None, leave_off: frozenset = frozenset()
               ) -> tuple[recall.Rounds, dict | None, dict | None, dict]:
        """Attach the adapter (keyed: its A from the preserved inputs, away from a state's earlier keys; under
        FSDP it is on already) beside a state's earlier ranks, train, in suppress mode check again and continue
        (the recall rounds), and with the neighbour guard put back listed neighbours that flipped. scale_lr: the
        lr is the default one, to be scaled to this model (a given lr is used as it is); own_optimizer: so is the
        optimiser (column steps give way to AdamW where the step is scaled); earlier: the state's facts;
        preserved: _preserved's; hold_off and leave_off: _subjects'. Returns the rounds, the keyed adapter's keys,
        the guard's report (None without the guard) and, into a state with repair on, the listed neighbours'
        leads before training (lune_fast.repair.watched)."""
        s = job.settings
        keys = None
        if s.adapter == "keyed":
            others = st.earlier_keys(hold_off) if st is not None else None
            keys = attach_keyed(self.model, self.encoder, job.facts, job.layout, preserved, s.key_ridge,
                                s.key_overlap, others, job.columns)
            if scale_lr:  # the default step, for this model's output scale (training and the recall rounds)
                job.lr_scale = step_scale(self.model, job.layout, preserved)
                if job.lr_scale != 1.0 and own_optimizer and s.optimizer in COLUMN_STEPS:  # as if AdamW were asked for
                    job.settings = s = replace(s, optimizer="adamw", lr=None).resolved()
        elif not self.fsdp:
            lora.attach(self.model, job.layout, seed=s.seed, backend=self.backend)
        if st is not None:
            st.attach_earlier(self.model, leave_off)
        # B is zero yet: the model answers as the base model with the state's ranks acting
        guard = Guard.of(self.model, self.encoder, job.facts, earlier, s.neighbor_guard) \
            if s.neighbor_guard != "off" and not self.fsdp else None
        watch = {}
        if st is not None and s.repair_neighbors:  # the listed neighbours' leads on the state as it serves them
            skip = {f.prompt for f in [*earlier, *job.facts]} | {r["prompt"] for e in st.repairs()
                                                                  for r in e["records"]}
            watch = repair.watched(self.model, self.encoder, job.facts, skip,
                                   guard.seen if guard is not None else {})
        data = job.train_data(self.model, dist=self.dist, preserved=preserved)
        outcome, error = train_keeping_last_good(self.model, data, train_settings(s, lr_scale=job.lr_scale), run)
        rounds = recall.Rounds(outcome, 0, error)
        if error is None and s.mode == "suppress":
            rounds = recall.recall_rounds(self.model, self.encoder, job, outcome, run, preserved, self.twins(s))
        if guard is None:
            return rounds, keys, None, watch
        rounds, report = guard_round(self.model, self.encoder, job, rounds, run, preserved, guard)
        return rounds, keys, report, watch

    def _result(self, job: plan.Plan, skipped: list[str], before, after, rounds: recall.Rounds,
                state: dict, cost: dict) -> ForgetResult:
        s, layout = job.settings, job.layout
        known = before.known_mask() if before is not None else None
        config = {**asdict(s), "rank": layout.rank, "alpha": layout.alpha, "targets": list(layout.targets),
                  "layers": list(layout.layers), "layers_spec": s.layers, "anchors_built": len(job.anchors),
                  "lr_scale": job.lr_scale,
                  "dtype": str(self.dtype).replace("torch.", ""), "facts": len(job.facts),
                  # the dtypes the recall rounds asked the model in (the training one first)
                  "checked_in": [str(d).replace("torch.", "") for d in (self.dtype, *self.checked_in(s))]
                  if s.mode == "suppress" and s.recall_rounds else []}
        examples = [] if before is None or after is None else [
            (p.prompt, b, a) for p, b, a in zip(before.probes, before.generations, after.generations)
            if p.kind == "forget"][:8]
        still = [] if after is None else [
            p.prompt for p, hit, rep in zip(after.probes, after.hits, after.replaced)
            if p.kind == "forget" and (rep is False if s.mode == "replace" else hit)]
        return ForgetResult(
            adapter=state, adapter_config=lora.peft_config(layout, str(self.model_dir),
                                                           self.model.config.num_hidden_layers),
            before=before.metrics(known) if before is not None else None,
            after=after.metrics(known) if after is not None else None,
            cost=cost, config=config, model=self.model_name, skipped=skipped, examples=examples,
            stopped=rounds.outcome.stopped, error=rounds.error, anchors=job.anchors,
            evaluation_before=before, evaluation_after=after, outcome=rounds.outcome, still_known=still,
            facts=job.facts)

    def _attach_sharded(self, s: Settings, layout: lora.LoraSettings) -> None:
        """Under FSDP: the request's plain adapter on the model, and the blocks sharded with it (once per
        process: the sharded model keeps that adapter)."""
        if self._sharded:
            raise SettingsError("under FSDP an Unlearner serves one forget() per process (its blocks are sharded "
                                "with that request's adapter); start a new run for the next request")
        lora.attach(self.model, layout, seed=s.seed, backend=self.backend, grouped=False)
        distributed.fully_shard_blocks(self.model)
        self._sharded = True

    def _settings(self, mode: str | None, overrides: dict, chat: bool = False, lifelong: bool = False) -> Settings:
        s = replace(self.defaults, **({"mode": mode} if mode else {}), **overrides)
        if self.fsdp and (s.adapter == "keyed" or s.preserve_weight > 0):
            raise SettingsError("keyed adapters and --preserve-weight are not supported under FSDP (they read whole "
                                "adapter matrices); use --adapter plain without --preserve-weight")
        s = s.resolved(sharded=self.fsdp, chat=chat, lifelong=lifelong)
        if self.fsdp and s.layers.startswith("auto"):
            raise SettingsError("--layers auto traces the unsharded model; give the layers explicitly under FSDP")
        s.check()
        return s

    def base_evaluation(self, facts, texts: list[str], replace_mode: bool, max_new_tokens: int,
                        progress: bool = False):
        """The frozen model's evaluation, computed once per (facts, texts, mode) and reused by later requests."""
        key = hashlib.sha256(repr((facts, texts, replace_mode, max_new_tokens)).encode()).hexdigest()
        if key not in self._base_evals:
            self._base_evals[key] = evaluate(self.model, self.encoder, facts, texts, replace_mode, max_new_tokens,
                                             progress, self.dist)
        return self._base_evals[key]

    def retain_texts(self, texts=None) -> list[str]:
        """Texts for retain perplexity: a file, a list, or the package's own."""
        if isinstance(texts, (str, Path)):
            return read_lines(texts)
        return list(texts) if texts is not None else read_lines(asset("retain_text.jsonl"))
