"""Recall rounds: after training, ask every forget prompt again (greedy, adapter on) and train on any target
that still comes out by another route ("the Blue Nile", once "Nile" is unlikely right after "is the").

A fact whose greedy answer still contains its target gives a new pair: the prompt plus the words said before
the target, answered by the target's tokens. Training then goes on with the same adapter, a fresh optimiser and
the steps left. A keyed adapter gives each subject its own column of B, so only the facts that came out (and
those about the same subject) train again; a plain adapter shares its weights, so every pair trains again.
Under data parallel each rank asks its share of the prompts and the answers are gathered, so that every rank
takes the same decision.

The loop ends: each round trains or stops it, there are at most Settings.recall_rounds rounds, and none starts
once the step budget is spent.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .data import Encoder, Fact, make_batch
from .distributed import Dist, shard, unshard
from .evaluate import answer_logprobs, answers_with, eos_ids, greedy
from .export import quantized
from .generate import generate
from .model import Transformer
from .plan import Plan
from .settings import train_settings
from .trainer import RunOptions, TrainOutcome, train_keeping_last_good
from .twin import StreamedTwin


def answers(model: Transformer, enc: Encoder, facts: list[Fact], max_new_tokens: int = 24,
            dist: Dist | None = None) -> list[list[int]]:
    """The model's greedy answer tokens to each fact's prompt (its first line). Under data parallel each rank
    answers its share; under FSDP every rank answers all of them (the sharded blocks must run the same forwards
    everywhere)."""
    split = dist if dist is not None and not dist.fsdp else None
    mine = shard(facts, split)
    return unshard(greedy(model, enc, [enc.prompt_ids(f.prompt, f.chat) for f in mine], max_new_tokens),
                   len(facts), split)


def up_to_target(enc: Encoder, f: Fact, said: list[int]) -> list[int] | None:
    """An answer's tokens up to and including the target, or None where it does not say the target."""
    cut = next((k for k in range(1, len(said) + 1) if answers_with(enc.decode(said[:k]), f.target)), None)
    return said[:cut] if cut else None


def self_negatives(model: Transformer, enc: Encoder, facts: list[Fact], max_new_tokens: int = 24,
                   dist: Dist | None = None) -> list[list[int] | None]:
    """The model's own greedy answer tokens up to and including the target, or None where it does not say the
    target."""
    return [up_to_target(enc, f, g) for f, g in zip(facts, answers(model, enc, facts, max_new_tokens, dist))]


def twin_choices(twin: StreamedTwin, enc: Encoder, prompts: list[list[int]], said: list[list[int]]
                 ) -> list[list[int]]:
    """The twin's greedy choice at each position of each answer `said`, teacher-forced after its prompt, and
    after its last token (len(g) + 1 choices): one pass of the twin over every sequence at once (right padding
    leaves the real positions as they are under the causal mask)."""
    width = max(len(p) + len(g) for p, g in zip(prompts, said))
    ids = torch.full((len(said), width), enc.pad_id, dtype=torch.long)
    pick = torch.zeros(len(said), width, dtype=torch.bool)
    for i, (p, g) in enumerate(zip(prompts, said)):
        ids[i, :len(p) + len(g)] = torch.tensor(p + g, dtype=torch.long)
        pick[i, len(p) - 1:len(p) + len(g)] = True  # the positions that predict each answer token, and the next
    chosen = twin.argmax_at(ids, pick).tolist()
    out, at = [], 0
    for g in said:
        out.append(chosen[at:at + len(g) + 1])
        at += len(g) + 1
    return out


def twin_answers(twin: StreamedTwin, model: Transformer, enc: Encoder, facts: list[Fact], said: list[list[int]],
                 max_new_tokens: int = 24) -> list[list[int]]:
    """The twin's own greedy answers (first line, as `answers`), found from `model`'s answers `said`: the
    twin, teacher-forced over an answer, accepts it up to the first token where its argmax differs (greedy is a
    function of its prefix); that token is the twin's, `model` drafts the rest from there, and the twin checks
    again. A pass fixes at least one more token of every answer still open, so there are at most
    max_new_tokens + 1; where the two dtypes agree, one."""
    if not facts:
        return []
    stop = enc.line_stop(model.config.vocab_size, model.device)
    eos = set(eos_ids(enc, model))
    prompts = [enc.prompt_ids(f.prompt, f.chat) for f in facts]
    current, out = [list(g) for g in said], [None] * len(facts)
    pending = list(range(len(facts)))
    for _ in range(max_new_tokens + 1):
        if not pending:
            break
        drafts = []
        for i, chose in zip(pending, twin_choices(twin, enc, [prompts[i] for i in pending],
                                                  [current[i] for i in pending])):
            g = current[i]
            k = next((j for j, (a, b) in enumerate(zip(chose, g)) if a != b), len(g))
            if k == len(g) and (len(g) >= max_new_tokens or stop.after(g, eos)[0]):
                out[i] = g  # the twin says every token, and stops where the draft stops
                continue
            fixed = g[:k] + [chose[k]]  # its own choice where it leaves the draft (or where the draft ended early)
            finished, started = stop.after(fixed, eos)
            if finished or len(fixed) >= max_new_tokens:
                out[i] = fixed
            else:
                drafts.append((i, fixed, started))
        if drafts:
            more = generate(model, [prompts[i] + fixed for i, fixed, _ in drafts],
                            max(max_new_tokens - len(fixed) for _, fixed, _ in drafts), eos_token_id=sorted(eos),
                            pad_token_id=enc.pad_id, stop=stop, started=[st for _, _, st in drafts])
            for (i, fixed, _), cont in zip(drafts, more):
                current[i] = fixed + cont[:max_new_tokens - len(fixed)]
        pending = [i for i, _, _ in drafts]
    return [g if g is not None else current[i] for i, g in enumerate(out)]


@torch.no_grad()
def lowest_probability(model: Transformer, enc: Encoder, pairs: list[tuple[list[int], list[int]]]) -> float:
    """The lowest mean token probability of the pairs' answers (as the trainer's stop criterion reads them)."""
    return float(answer_logprobs(model, make_batch(pairs, enc.pad_id)).exp().min())


def route_to(enc: Encoder, f: Fact, said: list[int] | None) -> tuple[list[int], list[int]] | None:
    """(prompt + the words said before the target, the target's tokens) from a greedy answer `said` that ends
    with the target; None where the target did not come out."""
    if said is None:
        return None
    start = next((j for j in range(len(said) - 1, -1, -1) if answers_with(enc.decode(said[j:]), f.target)), None)
    if start is None:
        return None
    return enc.prompt_ids(f.prompt, f.chat) + said[:start], said[start:]


# the stop threshold of round k is Settings.stop_prob × ROUND_FACTOR^k; with Settings.robust_to (or a route only
# another dtype took), also at most ROUND_FACTOR × the lowest probability the routes have now in the training
# model: a target the quantized export (or the float32 model) still says can be far below the schedule's
# threshold here, and a round whose threshold is already met trains nothing
ROUND_FACTOR = 0.25


@dataclass
class Rounds:
    outcome: TrainOutcome  # the first run followed by every continuation
    rounds: int  # continuations trained
    error: str | None  # the divergence message, if a continuation diverged (its last good adapter is kept)


def recall_rounds(model: Transformer, enc: Encoder, plan: Plan, outcome: TrainOutcome, run: RunOptions,
                  preserved=None, twins: dict[str, StreamedTwin] | None = None) -> Rounds:
    """Check and continue, up to plan.settings.recall_rounds times, after a first run that ended in `outcome`.
    twins: the model as loaded in other dtypes (Settings.check_dtypes), asked too, with the adapter as it is."""
    s = plan.settings
    rounds, error = 0, None
    for _ in range(s.recall_rounds):
        left = s.steps - outcome.steps
        if left <= 0:
            break
        with quantized(model, s.robust_to):  # as the export at that type answers, when asked for
            said = answers(model, enc, plan.facts, s.max_new_tokens, run.dist)
        found = [route_to(enc, f, up_to_target(enc, f, x)) for f, x in zip(plan.facts, said)]
        elsewhere = []  # routes only another dtype takes: asked once this dtype says none (the last gate)
        for twin in (twins or {}).values() if not any(found) else ():
            theirs = twin_answers(twin, model, enc, plan.facts, said, s.max_new_tokens)
            for i, x in enumerate(theirs):
                if x == said[i]:
                    continue
                if (r := route_to(enc, plan.facts[i], up_to_target(enc, plan.facts[i], x))) is not None:
                    found[i] = r
                    elsewhere.append(r)
        hits = [(i, r) for i, r in enumerate(found) if r is not None]
        routes = [r for _, r in hits]
        if not routes:
            break
        # a plain adapter's weights are shared: every pair trains again; a keyed one's column, by the facts on it
        out = {plan.column(i) for i, _ in hits}
        again = [(p, i) for p, i in zip(plan.pairs, plan.owners) if s.adapter == "plain" or plan.column(i) in out]
        owners = [i for _, i in again] + [i for i, _ in hits]
        data = plan.train_data(model, [p for p, _ in again] + routes, run.dist, preserved, owners=owners)
        # a target can still come out while its probability is under the stop threshold (nothing else is more
        # likely): each round asks for a quarter of the last round's threshold, so that it trains at all
        stop = s.stop_prob * ROUND_FACTOR ** (rounds + 1)
        # a route the quantized export or another dtype takes can be far below the threshold in this one
        if s.robust_to or elsewhere:
            stop = min(stop, ROUND_FACTOR * lowest_probability(model, enc, routes if s.robust_to else elsewhere))
        settings = replace(train_settings(s, steps=left, lr_scale=plan.lr_scale), stop_prob=stop)
        more, error = train_keeping_last_good(model, data, settings, replace(run, checkpoint_dir=None, resume=False))
        outcome, rounds = outcome.then(more), rounds + 1
        if error is not None:
            break
    return Rounds(outcome, rounds, error)
