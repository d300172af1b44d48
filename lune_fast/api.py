"""The drop-in API: keep a model loaded, turn deletion requests into adapters.

    u = Unlearner("default")                     # loads once
    result = u.forget("facts.jsonl")             # or a list of dicts; mode="replace" for edits
    result.save("out/")                          # PEFT adapter + report.json + report.md
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import torch

from . import distributed, lora
from .anchors import build_anchors
from .data import DataError, Encoder, Fact, make_batch, read_facts, read_lines
from .evaluate import answers_with, evaluate, metrics_table, report_markdown
from .io import atomic_output_dir
from .keyed import PREFIXES, prefixed_prompts
from .limits import check_context, check_memory, split_by_tokens
from .model import generate
from .trainer import TrainingDiverged, TrainOutcome, TrainSettings, train
from .weights import load_model, load_tokenizer, resolve_model_dir


# Training sequences are packed into rows of this many tokens (or the longest sequence): measured on 32
# facts (289 tokens), a step took 640 ms padded, 460 ms packed in rows of 64, 550 ms in one row (bf16, CPU).
PACK_TOKENS = 64


def asset(name: str) -> Path:
    return Path(str(resources.files("lune_fast.assets").joinpath(name)))


class SettingsError(ValueError):
    """A run setting out of its range."""


# The measured defaults of each mode and adapter kind (benchmarks/RESULTS.md, section 2), for the settings left
# at None. keyed: subject-keyed adapters on the MLP output of early layers (where causal tracing puts the facts'
# subjects); forgetting 32 facts at once they keep 0.84 of the neighbours (plain: 0.03; replace mode 0.93, plain
# 0.81) at retain perplexity x1.04 (plain: x1.60), in 1.7x the time. plain: ordinary LoRA, for FSDP and comparison.
MODE_DEFAULTS = {
    ("suppress", "keyed"): {"targets": "down", "layers": "10%-30%", "lr": 3e-2, "anchors": 0, "prompt_variants": 1,
                            "key_overlap": 1e-3},
    ("replace", "keyed"): {"targets": "down", "layers": "10%-30%", "lr": 2e-2, "anchors": 0, "prompt_variants": 2,
                           "key_overlap": 1e-2},
    ("suppress", "plain"): {"targets": "gate,up,down", "layers": "8-20", "lr": 1e-3, "anchors": 0,
                            "prompt_variants": 0},
    # all seven projections with two anchors per fact keep the most neighbours (0.81, vs 0.51 without)
    ("replace", "plain"): {"targets": "all", "layers": "8-20", "lr": 1e-3, "anchors": 2, "prompt_variants": 0},
}


@dataclass
class Settings:
    """Everything a run is made of; report.json's "config" is this, plus the mode. None = the measured default
    of the mode and adapter kind (MODE_DEFAULTS)."""
    mode: str = "suppress"  # suppress | replace
    # keyed: A fixed to the facts' subject keys, whitened against preserved text (lune_fast.keyed), rank = the
    # number of facts; plain: LoRA with random A. None = keyed (plain under FSDP).
    adapter: str | None = None
    # measured: NPO per token forgets as well as NPO per sequence and keeps the retain text far better on every
    # set tried (perplexity x1.49 vs x1.65, x1.55 vs x32.8, x1.89 vs x3.41; benchmarks/RESULTS.md)
    objective: str = "npo_tok"
    rank: int = 8  # plain adapters
    alpha: float = 16.0
    targets: str | None = None
    layers: str | None = None
    rslora: bool = False
    steps: int = 60
    lr: float | None = None
    beta: float | None = None
    stop_prob: float = 0.05
    replace_prob: float = 0.9
    grad_clip: float = 1.0
    seed: int = 0
    negatives: str = "gold"  # gold | self | both: the answer text trained against in suppress mode
    per_example_stop: bool = True  # measured: same forgetting, retain perplexity x1.66 instead of x14 (32 facts)
    # suppress: after training, ask each prompt again (greedy) and train on any answer that still comes out by
    # another route ("the Blue Nile"), at most this many times; 0 = trust the probability criterion alone.
    # Measured (32 facts): forget recall 0.03 -> 0.00 for a greedy pass or two (~2 s each), perplexity x1.49 -> x1.60
    recall_rounds: int = 2
    # each fact is also trained after this many prefixes (lune_fast.keyed.PREFIXES); measured with keyed adapters,
    # paraphrase recall 0.40 with none, 0.18-0.25 with one, 0.15-0.23 with two
    prompt_variants: int | None = None
    retain_weight: float = 1.0
    retain_loss: str = "nll"
    # per forget fact: same-template prompts with other subjects, kept by the retain term (plain replace: 2,
    # neighbours 0.51 -> 0.70 at 2x train time)
    anchors: int | None = None
    anchor_candidates: int = 12
    anchor_min_prob: float = 0.5
    # the preserved inputs (keyed adapters are whitened against them; preserve_weight > 0 also penalises the
    # relative change of the adapted projections' outputs on them, lune_fast.preserve): the forget prompts'
    # templates with other subjects (`preserve_prompts` per fact) and a text file (None = the package's)
    preserve_prompts: int = 12
    preserve_text: str | None = None
    preserve_weight: float = 0.0
    key_ridge: float = 1e-2  # keyed: ridge of the preserved-input moment, relative to its mean eigenvalue
    key_overlap: float | None = None  # keyed: ridge of the keys' Gram matrix (facts sharing a subject; set_keyed)
    refusals: str | None = None  # replace mode without a record replacement: file of refusal strings
    max_new_tokens: int = 24
    checkpoint_every: int = 0
    max_batch_tokens: int = 4096  # per micro-batch; larger forget sets accumulate gradients over several

    def resolved(self, sharded: bool = False) -> "Settings":
        """Every None filled with the measured default of the mode and adapter kind."""
        adapter = self.adapter or ("plain" if sharded else "keyed")
        defaults = MODE_DEFAULTS.get((self.mode, adapter), {})
        return replace(self, adapter=adapter, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def check(self) -> None:
        if self.mode not in ("suppress", "replace"):
            raise SettingsError(f"mode must be suppress or replace, got {self.mode!r}")
        from .losses import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise SettingsError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.negatives not in ("gold", "self", "both"):
            raise SettingsError(f"negatives must be gold, self or both, got {self.negatives!r}")
        if self.adapter not in ("keyed", "plain"):
            raise SettingsError(f"adapter must be keyed or plain, got {self.adapter!r}")
        if self.rank <= 0 or self.steps < 0 or self.lr <= 0:
            raise SettingsError("rank and lr must be positive and steps non-negative")
        if self.prompt_variants < 0 or self.prompt_variants > len(PREFIXES):
            raise SettingsError(f"prompt_variants must be 0-{len(PREFIXES)}, got {self.prompt_variants}")
        if self.retain_loss not in ("nll", "kl"):
            raise SettingsError(f"retain_loss must be nll or kl, got {self.retain_loss!r}")


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

    def report(self) -> dict:
        return {"model": self.model, "config": self.config, "before": self.before, "after": self.after,
                "cost": self.cost, "stopped": self.stopped, "error": self.error, "skipped_records": self.skipped}

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Adapter (PEFT format) + report.json + report.md, written to a temporary folder and renamed."""
        out = Path(out)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            lora.save_adapter(tmp, self.adapter, self.adapter_config)
            (tmp / "report.json").write_text(json.dumps(self.report(), indent=2) + "\n")
            (tmp / "report.md").write_text(report_markdown(self.model, self.config, self.before or {},
                                                           self.after or {}, self.cost, self.examples))
        return out

    def table(self) -> str:
        return metrics_table(self.before or {}, self.after or {})

    def attach_to(self, model) -> None:
        """Put this adapter on `model` the way a saved one is loaded (PEFT files, validated), e.g. to evaluate
        or attack it on another copy of the model."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            lora.load_adapter(model, self.save(Path(tmp) / "adapter"))


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls run at least twice as fast as fp32 here: CUDA, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 frozen weights where bf16 is native (measured: 2.0x the fp32 matmul rate on this
    project's AVX512-BF16 CPU, same unlearning quality), else float32. Adapters are float32 either way."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SettingsError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


class Unlearner:
    """Holds a frozen model and its tokenizer; each forget() trains a fresh adapter and leaves the model as
    it was."""

    def __init__(self, model: str = "default", dtype: str | torch.dtype = "auto", device: str = "cpu",
                 fsdp: bool = False, **defaults):
        """Under torchrun the forget set is split across the ranks (data parallel); fsdp=True also shards the
        frozen blocks (FSDP2). Every rank runs the same calls; rank 0 writes."""
        self.model_name = str(model)
        self.device = torch.device(device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.dist = distributed.from_env(fsdp, self.device)
        self.fsdp = self.dist is not None and self.dist.fsdp
        self.dtype = resolve_dtype(dtype, self.device)
        folder = self.model_dir = resolve_model_dir(model)
        # under FSDP each rank reads only the row chunks of the block weights that it will keep
        rows_of = (self.dist.rank, self.dist.world) if self.fsdp else None
        self.model = load_model(folder, dtype=self.dtype, device=self.device, rows_of=rows_of)
        self._sharded = False
        self.tokenizer = load_tokenizer(folder)
        self.encoder = Encoder(self.tokenizer)
        self.defaults = replace(Settings(), **defaults)
        self._retain_texts: list[str] | None = None
        self._base_evals: dict[str, object] = {}
        self._text_moments: dict[tuple, tuple] = {}

    # -- the one call ----------------------------------------------------------------------------------------
    def forget(self, records, mode: str | None = None, retain=None, evaluate_before: bool = True,
               evaluate_after: bool = True, retain_texts: list[str] | str | None = None, progress: bool = True,
               checkpoint_dir: Path | None = None, resume: bool = False, **overrides) -> ForgetResult:
        """Train an adapter that forgets (suppress) or replaces the records' answers; see Settings for the
        overrides. The model is left as it was; the adapter and the before/after METRICS are in the result."""
        s = self._settings(mode, overrides)
        read = read_facts(records)
        texts = self._retain(retain_texts)
        replace_mode = s.mode == "replace"
        t0 = time.perf_counter()
        if self.fsdp:  # the blocks are sharded (with their adapters) before anything runs the model
            lora_settings = self._shard_with_adapters(s, read.facts)
        # 1. what to train on; refuses what cannot fit before any work
        pairs, owners, facts = self._training_pairs(read.facts, s, read.skipped)
        if self.dist is not None and len(pairs) < self.dist.world:
            raise DataError(f"{len(pairs)} training example(s) for {self.dist.world} ranks: run on fewer processes")
        before = self.base_evaluation(facts, texts, replace_mode, s.max_new_tokens, progress) \
            if evaluate_before else None
        # 2. where the adapter goes, the retain anchors, the micro-batches
        if not self.fsdp:
            lora_settings = self._lora_settings(s, facts)
        anchors = build_anchors(self.model, self.encoder, facts, s.anchors, s.anchor_candidates, s.anchor_min_prob,
                                s.seed) if s.anchors > 0 else []
        batches, retain_batch = self._batches(distributed.shard(pairs, self.dist), anchors, retain, s,
                                              lora_settings)
        if self.fsdp and checkpoint_dir is not None:
            checkpoint_dir = None  # sharded optimiser state: checkpoints are a data-parallel feature for now
        # 3. the preserved inputs and the keyed adapter (counted as training), train (a diverged run keeps its
        # last good adapter), evaluate, detach
        t_train = time.perf_counter()
        keyed = s.adapter == "keyed"
        error = None
        try:
            preserved = self._preserved(facts, s, lora_settings) if keyed or s.preserve_weight > 0 else None
            if keyed:
                self._attach_keyed(facts, s, lora_settings, preserved)
            try:
                outcome = train(self.model, batches, lora_settings, _train_settings(s),
                    replace=replace_mode, retain=retain_batch, checkpoint_dir=checkpoint_dir, resume=resume,
                    progress=progress, dist=self.dist, attached=self.fsdp or keyed, preserved=preserved)
            except TrainingDiverged as e:
                error = str(e)
                outcome = TrainOutcome(steps=e.step - 1, stopped="diverged", seconds=0.0, tokens=0)
            if error is None and not replace_mode and s.recall_rounds > 0 and self.dist is None:
                outcome, error = self._train_on_what_still_comes_out(facts, pairs, owners, anchors, retain, s,
                                                                     lora_settings, outcome, progress, preserved)
            train_seconds = time.perf_counter() - t_train
            after = evaluate(self.model, self.encoder, facts, texts, replace_mode, s.max_new_tokens, progress,
                             self.dist) \
                if evaluate_after else None
            state = lora.adapter_state(self.model)
            trained = sum(p.numel() for p in lora.trainable_parameters(self.model))
        finally:
            if not self.fsdp:  # a sharded model stays as it is: one request per process under FSDP
                lora.detach(self.model)
        # 4. the result: adapter, METRICS (paraphrases/neighbours on what the base model answered), cost
        known = before.known_mask() if before is not None else None
        config = {**asdict(s), "rank": lora_settings.rank, "alpha": lora_settings.alpha,
                  "targets": list(lora_settings.targets), "layers": list(lora_settings.layers),
                  "layers_spec": s.layers, "anchors_built": len(anchors),
                  "dtype": str(self.dtype).replace("torch.", ""), "facts": len(facts)}
        cost = {"train_seconds": round(train_seconds, 3), "steps": outcome.steps, "train_tokens": outcome.tokens,
                "recall_rounds": outcome.recall_rounds,
                "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
                "trainable_params": trained, "device": str(self.device),
                "total_seconds": round(time.perf_counter() - t0, 3)}
        examples = [] if before is None or after is None else [
            (p.prompt, b, a) for p, b, a in zip(before.probes, before.generations, after.generations)
            if p.kind == "forget"][:8]
        return ForgetResult(
            adapter=state, adapter_config=lora.peft_config(lora_settings, str(self.model_dir),
                                                           self.model.config.num_hidden_layers),
            before=before.metrics(known) if before is not None else None,
            after=after.metrics(known) if after is not None else None,
            cost=cost, config=config, model=self.model_name, skipped=read.skipped, examples=examples,
            stopped=outcome.stopped, error=error, anchors=[a.prompt for a in anchors],
            evaluation_before=before, evaluation_after=after, outcome=outcome)

    def _train_on_what_still_comes_out(self, facts, pairs, owners, anchors, retain, s: Settings,
                                       lora_settings: lora.LoraSettings, outcome: TrainOutcome, progress: bool,
                                       preserved=None):
        """Greedy recall check with the adapter on; each fact whose target still appears becomes a new
        negative — its prompt plus the model's own words before the target, answered by the target's tokens —
        and training goes on (same adapter, fresh optimiser, the steps left) until none comes out or the
        rounds or steps run out. A keyed adapter gives each fact its own column of B, so only the facts that
        came out train on; a plain one shares its weights, so every pair trains on. Returns the combined outcome
        and the divergence message, if any."""
        error = None
        for _ in range(s.recall_rounds):
            left = s.steps - outcome.steps
            said = self.self_negatives(facts, s.max_new_tokens)  # with the adapter on
            found = [self._route_to(f, x) for f, x in zip(facts, said)]
            routes = [r for r in found if r is not None]
            if not routes or left <= 0:
                break
            again = [p for p, i in zip(pairs, owners) if s.adapter == "plain" or found[i] is not None]
            batches, retain_batch = self._batches(again + routes, anchors, retain, s, lora_settings)
            try:
                more = train(self.model, batches, lora_settings, replace(_train_settings(s), steps=left),
                             retain=retain_batch, progress=progress, attached=True, preserved=preserved)
            except TrainingDiverged as e:
                error = str(e)
                more = TrainOutcome(steps=e.step - 1, stopped="diverged", seconds=0.0, tokens=0)
            outcome = outcome.then(more)
            if error is not None:
                break
        return outcome, error

    def _route_to(self, f: Fact, said: list[int] | None):
        """(prompt + the words said before the target, the target's tokens) from a greedy answer `said` that
        ends with the target; None where the target did not come out."""
        if said is None:
            return None
        enc = self.encoder
        start = next((j for j in range(len(said) - 1, -1, -1) if answers_with(enc.decode(said[j:]), f.target)), None)
        if start is None:
            return None
        return enc.prompt_ids(f.prompt, f.chat) + said[:start], said[start:]

    def _settings(self, mode: str | None, overrides: dict) -> Settings:
        s = replace(self.defaults, **({"mode": mode} if mode else {}), **overrides)
        if s.mode == "replace" and "objective" not in overrides:
            s = replace(s, objective="replace")
        if self.fsdp and (s.adapter == "keyed" or s.preserve_weight > 0):
            raise SettingsError("keyed adapters and --preserve-weight are not supported under FSDP (they read whole "
                                "adapter matrices); use --adapter plain without --preserve-weight")
        s = s.resolved(sharded=self.fsdp)
        s.check()
        return s

    def _shard_with_adapters(self, s: Settings, facts: list[Fact]) -> lora.LoraSettings:
        if self._sharded:
            raise SettingsError("under FSDP an Unlearner serves one forget() per process (its blocks are sharded "
                                "with that request's adapter); start a new run for the next request")
        if s.layers.startswith("auto"):
            raise SettingsError("--layers auto traces the unsharded model; give the layers explicitly under FSDP")
        settings = self._lora_settings(s, facts)
        lora.attach(self.model, settings, seed=s.seed, grouped=False)
        distributed.fully_shard_blocks(self.model)
        self._sharded = True
        return settings

    def _lora_settings(self, s: Settings, facts: list[Fact]) -> lora.LoraSettings:
        n = self.model.config.num_hidden_layers
        if s.layers.startswith("auto"):  # "auto" or "auto:W": the W-layer window where the facts live
            from .locate import choose_layers, trace

            width = int(s.layers.split(":")[1]) if ":" in s.layers else 5
            effect, traced = trace(self.model, self.encoder, facts)
            layers = choose_layers(effect, width) if traced else \
                lora.parse_layers(MODE_DEFAULTS[(s.mode, s.adapter)]["layers"], n)
        else:
            layers = lora.parse_layers(s.layers, n)
        targets = lora.parse_targets(s.targets)
        if s.adapter == "plain":
            return lora.LoraSettings(rank=s.rank, alpha=s.alpha, targets=targets, layers=layers, rslora=s.rslora)
        # keyed: one rank per fact, scale 1 (column i of B is what the layer writes on reading subject i)
        adapted = lora.frozen_linears(self.model, lora.LoraSettings(targets=targets, layers=layers))
        room = min(m.in_features for m in adapted.values()) // 2
        if len(facts) > room:
            raise SettingsError(f"keyed adapters take one rank per fact: {len(facts)} facts is more than {room} for "
                                f"these projections; split the request or use --adapter plain")
        return lora.LoraSettings(rank=len(facts), alpha=float(len(facts)), targets=targets, layers=layers)

    def _batches(self, pairs, anchors, retain, s: Settings, lora_settings: lora.LoraSettings):
        """Packed micro-batches of the forget pairs, the retain batch (anchors + user retain facts), and the
        up-front memory check."""
        retain_pairs = [(self.encoder.prompt_ids(a.prompt, a.chat), a.answer_ids) for a in anchors]
        if retain is not None:
            retain_pairs += [self.encoder.pair(f.prompt, f.target, f.chat) for f in read_facts(retain).facts]
        retain_batch = make_batch(retain_pairs, self._pad_id(), pack=PACK_TOKENS) if retain_pairs else None
        batches = [make_batch(g, self._pad_id(), pack=PACK_TOKENS) for g in split_by_tokens(pairs, s.max_batch_tokens)]
        layers_run = self.model.config.num_hidden_layers - min(lora_settings.layers)
        tokens = max(b.input_ids.numel() for b in batches) + (retain_batch.input_ids.numel() if retain_batch else 0)
        check_memory(self.model.config, tokens, layers_run, self.dtype, self.device)
        return batches, retain_batch

    def base_evaluation(self, facts: list[Fact], texts: list[str], replace_mode: bool, max_new_tokens: int,
                        progress: bool = False):
        """The frozen model's evaluation, computed once per (facts, texts, mode) and reused by later requests."""
        import hashlib

        key = hashlib.sha256(repr((facts, texts, replace_mode, max_new_tokens)).encode()).hexdigest()
        if key not in self._base_evals:
            self._base_evals[key] = evaluate(self.model, self.encoder, facts, texts, replace_mode, max_new_tokens,
                                             progress, self.dist)
        return self._base_evals[key]

    def _preserved(self, facts: list[Fact], s: Settings, lora_settings: lora.LoraSettings):
        """The inputs the adapter should leave alone: the forget prompts' templates with other subjects, and the
        preservation text (its moments computed once per model and adapter layout, then reused)."""
        from .anchors import other_subject_prompts
        from .preserve import combine, group_moments

        prompts = [self.encoder.prompt_ids(p, f.chat)
                   for f, ps in zip(facts, other_subject_prompts(facts, s.preserve_prompts, s.seed)) for p in ps]
        key = (lora_settings.targets, lora_settings.layers, s.preserve_text)
        if key not in self._text_moments:
            texts = read_lines(s.preserve_text or asset("preserve_text.jsonl"))
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            self._text_moments[key] = group_moments(self.model, lora_settings, ids, self._pad_id())
        return combine(self.model, lora_settings, [group_moments(self.model, lora_settings, prompts, self._pad_id()),
                                                   self._text_moments[key]])

    def _attach_keyed(self, facts: list[Fact], s: Settings, lora_settings: lora.LoraSettings, preserved) -> None:
        from .keyed import key_positions, set_keyed, subject_keys

        keys = subject_keys(self.model, lora_settings, key_positions(self.encoder, facts), self._pad_id())
        lora.attach(self.model, lora_settings)
        set_keyed(self.model, keys, preserved, s.key_ridge, s.key_overlap)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _retain(self, texts) -> list[str]:
        if isinstance(texts, (str, Path)):
            return read_lines(texts)
        if texts is not None:
            return list(texts)
        if self._retain_texts is None:
            self._retain_texts = read_lines(asset("retain_text.jsonl"))
        return self._retain_texts

    def _training_pairs(self, facts: list[Fact], s: Settings, skipped: list[str]):
        """(prompt ids, answer ids) to train on, the index of the fact each belongs to, and the facts kept: a
        record whose answer tokenizes to nothing is skipped with its source; one longer than the model's context
        refuses the whole request."""
        enc = self.encoder
        refusals = (read_lines(s.refusals) if s.refusals else read_lines(asset("refusals.txt"))) \
            if s.mode == "replace" else []
        kept = []
        for i, f in enumerate(facts):
            answer = (f.replacement or refusals[i % len(refusals)]) if s.mode == "replace" else f.target
            if not enc.answer_ids(f.prompt, answer, f.chat):
                skipped.append(f"{f.source}: the answer {answer!r} tokenizes to no tokens")
            else:
                kept.append((f, answer))
        if not kept:
            raise DataError("no usable records: every answer tokenizes to no tokens")
        check_context([(f.source, len(enc.prompt_ids(f.prompt, f.chat)) + len(enc.answer_ids(f.prompt, a, f.chat)))
                       for f, a in kept], self.model.config)
        facts = [f for f, _ in kept]
        if s.mode == "replace":
            pairs = [enc.pair(f.prompt, a, f.chat) for f, a in kept]
            owners = list(range(len(kept)))
        else:
            pairs, owners = [], []
            own = self.self_negatives(facts, s.max_new_tokens) if s.negatives in ("self", "both") \
                else [None] * len(facts)
            for i, (f, neg) in enumerate(zip(facts, own)):
                prompt_ids = enc.prompt_ids(f.prompt, f.chat)
                if s.negatives in ("gold", "both") or neg is None:
                    pairs.append((prompt_ids, enc.answer_ids(f.prompt, f.target, f.chat)))
                    owners.append(i)
                if neg is not None and (s.negatives == "self" or neg != pairs[-1][1]):
                    pairs.append((prompt_ids, neg))
                    owners.append(i)
        for i, (f, answer) in enumerate(kept):  # the same answer after other openings, for paraphrases
            more = [enc.pair(p, answer, f.chat) for p in prefixed_prompts(enc, f)[:s.prompt_variants]]
            pairs += more
            owners += [i] * len(more)
        return pairs, owners, facts

    @torch.no_grad()
    def self_negatives(self, facts: list[Fact], max_new_tokens: int = 24) -> list[list[int] | None]:
        """The model's own greedy answer tokens up to and including the target, or None where it does
        not say the target."""
        prompts = [self.encoder.prompt_ids(f.prompt, f.chat) for f in facts]
        gens = generate(self.model, prompts, max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                        pad_token_id=self._pad_id(), stop=self.encoder.line_stop(self.model.config.vocab_size,
                                                                                 self.model.device))
        out = []
        for f, g in zip(facts, gens):
            cut = next((k for k in range(1, len(g) + 1) if answers_with(self.encoder.decode(g[:k]), f.target)), None)
            out.append(g[:cut] if cut else None)
        return out


def _train_settings(s: Settings) -> TrainSettings:
    return TrainSettings(**{f.name: getattr(s, f.name) for f in fields(TrainSettings) if hasattr(s, f.name)})


def load_settings_file(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read settings ({e})") from None
