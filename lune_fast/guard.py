"""The neighbour guard: a request's listed neighbours that the adapter flipped are put back before it returns.

Before training, the records' neighbours (prompt, answer) that the base model answers — each answer token the
most likely one, teacher-forced (trainer.answer_margins > 0), which is what greedy decoding says when the answer
comes first — are the guarded ones, each with the lead it had. After training and the recall rounds one batched
forward checks them again: a neighbour has flipped when its lead fell under min(ln 2, half its base lead). Half
the base lead, so that a neighbour the base model answers by a hair ("Halloween falls in the month of" →
October, barely ahead of November) is guarded too; at most ln 2, so that a confident one need not stay as
confident; and a lead, not a bare argmax, because on a near-tie a batch forward and the decoder's KV-cache path
round differently in bf16. Flipped neighbours are trained on by one more round: the request's pairs as before,
the retain term on them, and a stop that needs both the forget criterion and those leads back. The round runs
at most GUARD_STEPS steps (and the steps left); a round that does not meet both is undone (the adapter stays as
training left it), and the neighbours it could not put back are reported, not hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from . import lora
from .data import Encoder, Fact, listed_neighbors, make_batch
from .keyed import subject_groups
from .model import Transformer
from .plan import Pair, Plan
from .recall import ROUND_FACTOR, Rounds
from .settings import train_settings
from .trainer import RunOptions, answer_margins, copy_into, train_keeping_last_good


# the guard round's budget: a neighbour that a few steps cannot put back is one the forgetting needs to move
GUARD_STEPS = 12
MAX_LEAD = math.log(2.0)  # a guarded neighbour must get back half its base lead, at most this (twice as likely)


@torch.no_grad()
def leads(model: Transformer, pairs: list[Pair], pad_id: int) -> list[float]:
    """Per pair: its answer's smallest lead over the most likely other token, teacher-forced (answer_margins)."""
    if not pairs:
        return []
    b = make_batch(pairs, pad_id).to(model.device)
    h = model(b.input_ids, return_hidden=True, select=b.sel)
    return answer_margins(model.logits(h), b.targets, b.seq, b.n_seq).tolist()


@dataclass
class Guard:
    pairs: list[Pair]  # the neighbours the base model answers
    prompts: list[str]
    need: list[float]  # the lead each must keep: min(MAX_LEAD, half the base model's)
    seen: dict = field(default_factory=dict)  # (prompt, answer) -> lead, for every listed neighbour checked

    @classmethod
    def of(cls, model: Transformer, enc: Encoder, facts: list[Fact], earlier: list[Fact] | tuple = (),
           scope: str = "all") -> "Guard":
        """The listed neighbours of `facts` and of a lifelong state's `earlier` facts that the model answers as it
        is (call it before training: the base model with the state's ranks acting), leaving out neighbours
        that are forget prompts themselves (a request may list another of its facts as a neighbour). `scope`
        "subjects": of the earlier facts' neighbours only those about one of `facts`' subjects (about_subjects)."""
        if scope == "subjects":
            earlier = about_subjects(enc, facts, earlier)
        listed = list(dict.fromkeys((p, t, f.chat) for f, p, t in listed_neighbors([*facts, *earlier])))
        pairs = [enc.pair(p, t, chat) for p, t, chat in listed]
        got = leads(model, pairs, enc.pad_id)
        keep = [(x, p, min(MAX_LEAD, m / 2)) for x, (p, _, _), m in zip(pairs, listed, got) if m > 0]
        return cls([k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep],
                   {(p, t): m for (p, t, _), m in zip(listed, got)})

    def flipped(self, model: Transformer, pad_id: int) -> list[int]:
        return [i for i, (m, n) in enumerate(zip(leads(model, self.pairs, pad_id), self.need)) if m < n]


def about_subjects(enc: Encoder, facts: list[Fact], earlier: list[Fact] | tuple) -> list[Fact]:
    """`earlier` with their listed neighbours cut to those about one of `facts`' subjects (keyed.subject_groups):
    the prompts a keyed request's new ranks read as they read their own subject ("The currency of Japan is the"
    when "The capital of Japan is" is forgotten) — the ones it can flip however far from its own relation, and
    the ones its columns can put back. Every earlier fact stays (its prompt is never guarded)."""
    listed = [(i, p, t) for i, f in enumerate(earlier) for p, t in f.neighbors]
    groups = subject_groups(enc, [*facts, *(Fact(p, t, chat=earlier[i].chat) for i, p, t in listed)])
    about = {(i, p) for (i, p, _), g in zip(listed, groups[len(facts):]) if g < len(facts)}
    return [replace(f, neighbors=[(p, t) for p, t in f.neighbors if (i, p) in about]) for i, f in enumerate(earlier)]


def guard_round(model: Transformer, enc: Encoder, plan: Plan, rounds: Rounds, run: RunOptions, preserved,
                guard: Guard) -> tuple[Rounds, dict]:
    """Check the guarded neighbours on the trained adapter; train once more on any that flipped. Returns the
    rounds (this one appended to their outcome) and what was checked, flipped and put back."""
    s = plan.settings
    flipped = guard.flipped(model, enc.pad_id)
    report = {"guarded": len(guard.pairs), "flipped": [guard.prompts[i] for i in flipped], "still_flipped": []}
    left = s.steps - rounds.outcome.steps
    if not flipped or left <= 0 or rounds.error is not None:
        report["still_flipped"] = report["flipped"]
        return rounds, report
    data = plan.train_data(model, dist=run.dist, preserved=preserved,
                           retain_first=[guard.pairs[i] for i in flipped])
    # the forgotten facts' columns must move to put a neighbour back: none is held
    settings = replace(train_settings(s, steps=min(left, GUARD_STEPS), lr_scale=plan.lr_scale,
                                      retain_keep=[guard.need[i] for i in flipped]), hold_done=False)
    if s.mode == "suppress":  # the last recall round's threshold
        settings = replace(settings, stop_prob=s.stop_prob * ROUND_FACTOR ** rounds.rounds)
    params = lora.trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    more, error = train_keeping_last_good(model, data, settings, replace(run, checkpoint_dir=None, resume=False))
    if more.stopped == "criterion" and error is None:
        report["still_flipped"] = [guard.prompts[i] for i in guard.flipped(model, enc.pad_id)]
    else:  # the forgetting and the neighbours could not both be had: the request's result stands as it was
        copy_into(before, params)
        report["still_flipped"] = report["flipped"]
        report["reverted"] = True
    return Rounds(rounds.outcome.then(more), rounds.rounds, rounds.error), report
