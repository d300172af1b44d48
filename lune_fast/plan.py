"""Planning a request, before any training: what to train (the (prompt, answer) pairs of each fact, with its
prompt variants and refusals), where the adapter goes (targets, layers, rank), and the micro-batches.

A Plan is what the trainer, the keyed adapter and the recall rounds all read; it holds token ids only.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import lora
from .assets import asset
from .data import DataError, Encoder, Fact, make_batch, read_facts, read_lines
from .distributed import Dist, shard
from .limits import ResourceError, check_context, check_memory, split_by_tokens
from .model import Transformer
from .settings import MODE_DEFAULTS, PREFIXES, Settings, SettingsError
from .subjects import subject_text
from .trainer import TrainData

# Training sequences are packed into rows of this many tokens (or the longest sequence): a packed step beats
# both a padded one and one long row (RESULTS.md section 5, "Where the time went").
PACK_TOKENS = 64

Pair = tuple[list[int], list[int]]


def prefixed_prompts(enc: Encoder, f: Fact) -> list[str]:
    """The fact's prompt after each of PREFIXES (those naming the subject only where one is found)."""
    subject = subject_text(enc, f)
    return [p.format(s=subject) + f.prompt for p in PREFIXES if subject or "{s}" not in p]


def answers(enc: Encoder, facts: list[Fact], s: Settings, model: Transformer, skipped: list[str]) -> list[tuple[Fact, str]]:
    """Each usable fact with the answer its pairs train: the target (suppress), or the replacement, else a
    refusal (replace). A record whose answer tokenizes to nothing is skipped with its source; one longer than
    the model's context refuses the whole request."""
    refusals = read_lines(s.refusals or asset("refusals.txt")) if s.mode == "replace" else []
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
                   for f, a in kept], model.config)
    return kept


def training_pairs(enc: Encoder, kept: list[tuple[Fact, str]], s: Settings, own: list[list[int] | None] | None = None
                   ) -> tuple[list[Pair], list[int]]:
    """The pairs to train and the index of the fact each belongs to. In suppress mode the answer is the gold
    target, the model's own words up to it (`own`, lune_fast.recall.self_negatives), or both
    (s.negatives); each fact is also trained after its first s.prompt_variants prefixes."""
    pairs, owners = [], []
    for i, (f, answer) in enumerate(kept):
        prompt_ids = enc.prompt_ids(f.prompt, f.chat)
        neg = own[i] if own is not None else None
        if s.mode == "replace" or s.negatives in ("gold", "both") or neg is None:
            pairs.append((prompt_ids, enc.answer_ids(f.prompt, answer, f.chat)))
            owners.append(i)
        if s.mode == "suppress" and neg is not None and (s.negatives == "self" or neg != pairs[-1][1]):
            pairs.append((prompt_ids, neg))
            owners.append(i)
    for i, (f, answer) in enumerate(kept):  # the same answer after other openings, for paraphrases
        more = [enc.pair(p, answer, f.chat) for p in prefixed_prompts(enc, f)[:s.prompt_variants]]
        pairs += more
        owners += [i] * len(more)
    return pairs, owners


def adapter_layout(model: Transformer, enc: Encoder, facts: list[Fact], s: Settings) -> lora.LoraSettings:
    """Targets, layers and rank. Layers "auto[:W]": the W-layer window where causal tracing finds the facts
    (lune_fast.locate). A keyed adapter has one rank per fact at scale 1: column i of B is what the layer
    writes on reading subject i."""
    n = model.config.num_hidden_layers
    if s.layers.startswith("auto"):
        from .locate import choose_layers, trace

        width = int(s.layers.split(":")[1]) if ":" in s.layers else 5
        effect, traced = trace(model, enc, facts)
        layers = choose_layers(effect, width) if traced else \
            lora.parse_layers(MODE_DEFAULTS[(s.mode, s.adapter)]["layers"], n)
    else:
        layers = lora.parse_layers(s.layers, n)
    targets = lora.parse_targets(s.targets)
    if s.adapter == "plain":
        return lora.LoraSettings(rank=s.rank, alpha=s.alpha, targets=targets, layers=layers, rslora=s.rslora)
    adapted = lora.frozen_linears(model, lora.LoraSettings(targets=targets, layers=layers))
    room = min(m.in_features for m in adapted.values()) // 2
    if len(facts) > room:
        raise SettingsError(f"keyed adapters take one rank per fact: {len(facts)} facts is more than {room} for "
                            f"these projections; split the request or use --adapter plain")
    return lora.LoraSettings(rank=len(facts), alpha=float(len(facts)), targets=targets, layers=layers)


@dataclass
class Plan:
    """One request, planned: the settings it resolved to, the facts kept, the pairs to train (owners[j] = the
    fact pair j trains), the retain pairs (anchors and the user's retain facts), the adapter layout."""
    settings: Settings
    facts: list[Fact]
    pairs: list[Pair]
    owners: list[int]
    retain_pairs: list[Pair]
    layout: lora.LoraSettings
    pad_id: int
    anchors: list[str]  # the anchor prompts behind the retain pairs
    lr_scale: float = 1.0  # keyed: the factor on settings.lr for this model (lune_fast.keyed.step_scale)
    # keyed: the column of B each fact trains, its subject's (lune_fast.keyed.subject_groups); None: its own
    columns: list[int] | None = None

    def column(self, fact: int) -> int:
        return fact if self.columns is None else self.columns[fact]

    def train_data(self, model: Transformer, pairs: list[Pair] | None = None, dist: Dist | None = None,
                   preserved=None, retain_first: list[Pair] = (), owners: list[int] | None = None) -> TrainData:
        """Packed micro-batches of this process's share of `pairs` (default: all of the plan's; `owners`: the
        fact of each) and the retain batch (`retain_first`, then the plan's retain pairs), after the up-front
        memory check. A keyed adapter's data also says which column of B each sequence trains (its fact's
        subject's)."""
        s = self.settings
        if pairs is None:
            pairs, owners = self.pairs, self.owners
        # (prompt, answer, owner): grouped as the pairs are
        groups = micro_batches([(*p, i) for p, i in zip(pairs, owners or [-1] * len(pairs))], s.max_batch_tokens, dist)
        batches = [make_batch([(p, a) for p, a, _ in g], self.pad_id, pack=PACK_TOKENS) for g in groups]
        columns = [[self.column(i) for *_, i in g] for g in groups] if s.adapter == "keyed" and owners is not None \
            else None
        kept = list(retain_first) + self.retain_pairs
        retain = make_batch(kept, self.pad_id, pack=PACK_TOKENS) if kept else None
        layers_run = model.config.num_hidden_layers - min(self.layout.layers)
        tokens = max((b.input_ids.numel() for b in batches), default=0) + (retain.input_ids.numel() if retain else 0)
        check_memory(model.config, tokens, layers_run, model.dtype, model.device)
        return TrainData(batches, retain, preserved, columns)


def micro_batches(pairs: list[Pair], max_tokens: int, dist: Dist | None = None) -> list[list[Pair]]:
    """This process's share of the pairs (every world-th), in groups of at most max_tokens (items may carry more
    after the prompt and the answer: they are grouped alike). Under FSDP every rank gets the same number of
    groups: the sharded blocks all-gather in every forward, so a rank with one forward more than the others would
    wait for them forever."""
    groups = split_by_tokens(shard(pairs, dist), max_tokens)
    if dist is None or not dist.fsdp:
        return groups
    n = max(len(split_by_tokens(shard(pairs, Dist(r, dist.world)), max_tokens)) for r in range(dist.world))
    mine = shard(pairs, dist)
    if len(mine) < n:
        raise ResourceError(f"under FSDP every rank needs {n} micro-batches but this one has {len(mine)} example(s); "
                            f"raise --max-batch-tokens or run on fewer ranks")
    cuts = [round(i * len(mine) / n) for i in range(n + 1)]
    return [mine[a:b] for a, b in zip(cuts, cuts[1:])]


def retain_pairs(enc: Encoder, anchors, retain) -> list[Pair]:
    """Pairs the retain term keeps: the anchors' own answers, and the user's retain facts (a path or records)."""
    out = [(enc.prompt_ids(a.prompt, a.chat), a.answer_ids) for a in anchors]
    if retain is not None:
        out += [enc.pair(f.prompt, f.target, f.chat) for f in read_facts(retain).facts]
    return out
