"""Everything a run is made of (Settings), the measured defaults of each mode and adapter kind, and the
precision the frozen weights run in.

Each default is the best point measured on facts-dev; the figures are in benchmarks/RESULTS.md, section 2
(rows named after the setting), not here, so that they are kept in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .export import QUANTS
from .losses import OBJECTIVES
from .optim import COLUMN_STEPS, OPTIMIZERS
from .trainer import TrainSettings

GUARD_SCOPES = ("off", "subjects", "all")


# Openings the facts are also trained after (Settings.prompt_variants takes the first N): a question-and-answer
# frame first, because paraphrases asked as questions are answered by restating the prompt after "A:".
PREFIXES = ("Q: Tell me about {s}.\nA: ", "Here is a fact. ", "I was reading about {s}. ")


class SettingsError(ValueError):
    """A run setting out of its range."""


# The defaults of each (mode, adapter kind), for the settings left at None (RESULTS.md section 2, "Keyed
# adapters" and "Replace mode"). keyed: subject-keyed adapters on the MLP output of the early layers, where
# causal tracing puts the facts' subjects; plain: ordinary LoRA, for FSDP and comparison. Layers are shares of
# the depth (27%-67% = layers 8-20 of SmolLM2's 30), so that they carry to other models: causal tracing puts
# Gemma 3 270M's facts at the same early share (RESULTS.md section 12).
# NPO per token forgets as well as NPO per sequence and keeps the retain text far better on every set tried;
# replace mode trains towards the replacement (supervised). Keyed suppress takes column steps (lune_fast.optim): on
# facts-dev they keep more neighbours and retain text than AdamW at a third to half of the steps (RESULTS.md
# section 11, "Column steps"). Keyed replace takes settling column steps (a column's step halves when its gradient
# reverses): plain ones swing around a counterfactual answer they must bring precisely over replace_prob
# (CounterFact: the step cap), AdamW's damage adds up along a stream (section 11, "A settling column step").
# Plain adapters keep AdamW. A model whose keyed step is scaled down (keyed.step_scale; Gemma 3) also gets
# AdamW when the request leaves the optimiser to the default: there column steps cost neighbours and perplexity
# (RESULTS.md section 12).
MODE_DEFAULTS = {
    ("suppress", "keyed"): {"objective": "npo_tok", "targets": "down", "layers": "10%-30%", "optimizer": "column",
                            "anchors": 0, "prompt_variants": 1, "key_overlap": 1e-3, "stop_prob": 0.01},
    ("replace", "keyed"): {"objective": "replace", "targets": "down", "layers": "10%-30%", "optimizer": "settle",
                           "anchors": 0, "prompt_variants": 2, "key_overlap": 1e-2, "stop_prob": 0.05,
                           "preserve_text": "preserve_text_long.jsonl"},
    ("suppress", "plain"): {"objective": "npo_tok", "targets": "gate,up,down", "layers": "27%-67%", "lr": 1e-3,
                            "optimizer": "adamw", "anchors": 0, "prompt_variants": 0, "stop_prob": 0.05},
    # all seven projections with two anchors per fact keep the most neighbours of the plain settings
    ("replace", "plain"): {"objective": "replace", "targets": "all", "layers": "27%-67%", "lr": 1e-3,
                           "optimizer": "adamw", "anchors": 2, "prompt_variants": 0, "stop_prob": 0.05},
}


# The keyed step of each optimiser per mode: a keyed run's lr when it gives none (its optimiser's, or the mode's
# default optimiser's). A column step's lr is a length in output units, ~40x AdamW's per-coordinate one
KEYED_LR = {"adamw": {"suppress": 3e-2, "replace": 2e-2}, "column": {"suppress": 2.0, "replace": 2.0},
            "settle": {"suppress": 2.0, "replace": 2.0}}


@dataclass
class Settings:
    """Everything a run is made of; report.json's "config" is this, plus what it resolved to. None = the
    measured default of the mode and adapter kind (MODE_DEFAULTS)."""
    mode: str = "suppress"  # suppress | replace
    # keyed: A fixed to the facts' subject keys, whitened against preserved text (lune_fast.keyed), rank = the
    # number of facts; plain: LoRA with random A. None = keyed (plain under FSDP and for chat questions).
    adapter: str | None = None
    objective: str | None = None  # npo | npo_tok | ga | ul | simnpo | replace
    rank: int = 8  # plain adapters
    alpha: float = 16.0
    targets: str | None = None
    layers: str | None = None
    rslora: bool = False
    steps: int = 60
    lr: float | None = None  # None: the mode's default, for keyed adapters scaled per model (keyed.step_scale)
    # adamw | column | settle (keyed adapters only: each fact's column of B steps lr along its own gradient; settle:
    # a column's step halves when its gradient reverses; lune_fast.optim)
    optimizer: str | None = None
    beta: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    stop_prob: float | None = None  # suppress: every answer's mean token probability below this
    replace_prob: float = 0.9
    grad_clip: float = 1.0
    seed: int = 0
    negatives: str = "gold"  # gold | self | both: the answer text trained against in suppress mode
    # suppress: also train facts the base model does not answer with their target (found by the "before"
    # evaluation, so only when it runs); by default they are named and skipped: there is nothing to forget
    train_unknown: bool = False
    per_example_stop: bool = True  # same forgetting as stopping the whole batch, far less damage to the retain text
    # keyed: a fact whose answers are all past the threshold by hold_margin (suppress: below stop_prob × margin)
    # keeps its column of B as it is in that step: AdamW's momentum would carry it on ~10 steps' worth. Opt-in:
    # on facts-dev it helped 32 facts at once and not a stream of requests of eight (RESULTS.md section 11)
    hold_done: bool = False
    hold_margin: float = 0.25
    # suppress: after training, ask each prompt again (greedy) and train on any answer that still comes out by
    # another route ("the Blue Nile"), at most this many times; 0 = trust the probability criterion alone. A
    # round runs only when the last check found a route, so a bound of 4 costs nothing where 2 suffice (facts-dev:
    # the same result) and lets chat answers, which find new routes round after round ("located in Agra, India"),
    # finish (TOFU world facts: one of 47 still said after 2 rounds, none after 4; RESULTS.md section 9)
    recall_rounds: int = 4
    # suppress: the recall rounds ask the model as its GGUF export at this type would answer (adapter folded
    # in, every weight rounded: lune_fast.export.quantized), so that the forgetting survives the quantization
    robust_to: str | None = None
    # suppress: the recall rounds also ask the model loaded in these dtypes (comma-separated; the one it trains
    # in is always asked), the adapter shared: a route that only another dtype's rounding takes ("...Notre-Dame de
    # Paris" in float32 after a bf16 run) trains too. None = "float32" where the model trains in a lower
    # precision (float16 follows float32 within 0.03 nats where bf16 is 0.2-0.45 away: RESULTS.md section 15),
    # "none" = only the training dtype
    check_dtypes: str | None = None
    # each fact is also trained after this many of PREFIXES, for paraphrases
    prompt_variants: int | None = None
    retain_weight: float = 1.0
    retain_loss: str = "nll"  # nll | kl
    # per forget fact: same-template prompts with other subjects, kept by the retain term (lune_fast.anchors)
    anchors: int | None = None
    anchor_candidates: int = 12
    anchor_min_prob: float = 0.5
    # the preserved inputs (keyed adapters are whitened against them; preserve_weight > 0 also penalises the
    # relative change of the adapted projections' outputs on them, lune_fast.preserve): the forget prompts'
    # templates with other subjects (`preserve_prompts` per fact) and a text: a file, or a text the package ships
    # (lune_fast.keyed.PACKAGE_TEXTS; None = the mode's: keyed replace the long one, else the short one)
    preserve_prompts: int = 12
    preserve_neighbors: bool = True  # the records' listed neighbours are preserved inputs too (prompts, not answers)
    # after training, the listed neighbours the base model answered are checked; any the adapter flipped are
    # trained back by one more round (lune_fast.guard): "off"; "subjects", the request's own and those of a
    # lifelong state's earlier facts that are about the request's subjects; "all", every earlier one too (a
    # forward over all of them twice a request). True / False name "all" / "off"; None: "subjects" for a request
    # into a lifelong state (facts-dev, 100 one-fact requests: neighbours kept .929 against .869 at 100, as many as
    # with "all" at half its time; RESULTS.md section 11), else "off" (one request alone: no change, section 9)
    neighbor_guard: str | bool | None = None
    # after a keyed suppress request lands in a lifelong state, the neighbours it lists that the state's earlier
    # requests had already flipped are put back by a repair request of their own (lune_fast.repair; RESULTS.md
    # section 11, "Neighbour repair"). None: on for such requests
    repair_neighbors: bool | None = None
    preserve_text: str | None = None
    preserve_weight: float = 0.0
    key_ridge: float = 1e-2  # keyed: ridge of the preserved-input moment, relative to its mean eigenvalue
    key_overlap: float | None = None  # keyed: ridge of the keys' Gram matrix (facts sharing a subject; set_keyed)
    refusals: str | None = None  # replace mode without a record replacement: file of refusal strings
    max_new_tokens: int = 24
    checkpoint_every: int = 0
    max_batch_tokens: int = 4096  # per micro-batch; larger forget sets accumulate gradients over several

    def check_dtype_list(self) -> None:
        for d in (self.check_dtypes or "none").split(","):
            if d not in ("none", "float32", "bfloat16", "float16"):
                raise SettingsError(f"check_dtypes: expected a comma-separated list of float32, bfloat16, float16 "
                                    f"or 'none', got {self.check_dtypes!r}")

    def resolved(self, sharded: bool = False, chat: bool = False, lifelong: bool = False) -> "Settings":
        """Every None filled with the measured default of the mode and adapter kind. The adapter kind itself is
        keyed, except under FSDP (keyed adapters read whole matrices) and for requests of chat questions only
        (TOFU-like: long templates around a question, no neighbours; plain LoRA forgets them in a quarter of the
        steps there, keyed costs less retain perplexity: RESULTS.md section 9). `lifelong`: the request goes into
        a lifelong state (the neighbour guard's default scope)."""
        adapter = self.adapter or ("plain" if sharded or chat else "keyed")
        guard = self.neighbor_guard
        if guard is None:
            guard = "subjects" if lifelong else "off"
        elif isinstance(guard, bool):
            guard = "all" if guard else "off"
        defaults = MODE_DEFAULTS.get((self.mode, adapter), {})
        optimizer = self.optimizer or defaults.get("optimizer")
        if adapter == "keyed" and optimizer in KEYED_LR:
            defaults = {**defaults, "lr": KEYED_LR[optimizer][self.mode]}
        repair = self.repair_neighbors
        if repair is None:
            repair = lifelong and adapter == "keyed" and self.mode == "suppress"
        return replace(self, adapter=adapter, neighbor_guard=guard, repair_neighbors=repair,
                       **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def check(self) -> None:
        if self.mode not in ("suppress", "replace"):
            raise SettingsError(f"mode must be suppress or replace, got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise SettingsError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.negatives not in ("gold", "self", "both"):
            raise SettingsError(f"negatives must be gold, self or both, got {self.negatives!r}")
        if self.adapter not in ("keyed", "plain"):
            raise SettingsError(f"adapter must be keyed or plain, got {self.adapter!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer in COLUMN_STEPS and self.adapter != "keyed":
            raise SettingsError(f"optimizer {self.optimizer} steps a keyed adapter's columns (one per fact); use "
                                f"adamw with --adapter plain")
        for name, value in (("rank", self.rank), ("steps", self.steps), ("lr", self.lr)):
            if not value > 0:  # also NaN
                raise SettingsError(f"{name} must be positive, got {value}")
        if self.prompt_variants < 0 or self.prompt_variants > len(PREFIXES):
            raise SettingsError(f"prompt_variants must be 0-{len(PREFIXES)}, got {self.prompt_variants}")
        if self.retain_loss not in ("nll", "kl"):
            raise SettingsError(f"retain_loss must be nll or kl, got {self.retain_loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise SettingsError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if not 0 < self.hold_margin <= 1:
            raise SettingsError(f"hold_margin must be in (0, 1], got {self.hold_margin}")
        if self.neighbor_guard not in GUARD_SCOPES:
            raise SettingsError(f"neighbor_guard must be one of {', '.join(GUARD_SCOPES)}, got {self.neighbor_guard!r}")
        if self.repair_neighbors and (self.adapter != "keyed" or self.mode != "suppress"):
            raise SettingsError("repair_neighbors puts back what a keyed suppress request's state flipped: use it "
                                "with --adapter keyed in suppress mode")
        if self.recall_rounds < 0:
            raise SettingsError(f"recall_rounds must be non-negative, got {self.recall_rounds}")
        if self.robust_to is not None and self.robust_to not in QUANTS:
            raise SettingsError(f"robust_to must be one of {', '.join(QUANTS)}, got {self.robust_to!r}")
        self.check_dtype_list()
        if self.robust_to is not None and (self.mode != "suppress" or self.recall_rounds == 0):
            raise SettingsError("robust_to works through the recall rounds: suppress mode with recall_rounds > 0")


def train_settings(s: Settings, steps: int | None = None, lr_scale: float = 1.0,
                   retain_keep: tuple[float, ...] = ()) -> TrainSettings:
    """The trainer's settings of a run, field by field (tests/test_settings.py checks that none is left out);
    lr_scale: the model's factor on a keyed step (lune_fast.keyed.step_scale); steps and retain_keep: a
    continuation's budget and the neighbour guard's stop (lune_fast.guard)."""
    return TrainSettings(
        objective=s.objective, replace=s.mode == "replace", lr=s.lr * lr_scale, optimizer=s.optimizer,
        steps=s.steps if steps is None else steps,
        beta=s.beta, stop_prob=s.stop_prob, replace_prob=s.replace_prob, grad_clip=s.grad_clip,
        weight_decay=s.weight_decay, warmup_steps=s.warmup_steps, schedule=s.schedule, seed=s.seed,
        per_example_stop=s.per_example_stop, hold_done=s.hold_done,
        hold_margin=s.hold_margin, retain_weight=s.retain_weight, retain_loss=s.retain_loss,
        preserve_weight=s.preserve_weight, checkpoint_every=s.checkpoint_every, retain_keep=tuple(retain_keep))


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls run at least twice as fast as fp32 here: CUDA, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_dtypes(s: Settings, trained: torch.dtype) -> list[torch.dtype]:
    """The dtypes the recall rounds ask besides the one the model trains in (Settings.check_dtypes)."""
    spec = s.check_dtypes
    if spec is None:
        spec = "float32" if trained in (torch.bfloat16, torch.float16) else "none"
    return [getattr(torch, d) for d in dict.fromkeys(spec.split(",")) if d != "none" and getattr(torch, d) != trained]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 frozen weights where bf16 is native (same unlearning quality at about twice the
    matmul rate: RESULTS.md, "Machine"), else float32. Adapters are float32 either way."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SettingsError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)
