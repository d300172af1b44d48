"""The neighbour guard: a request's listed neighbours that the adapter flipped are put back before it returns.

Before training, the records' neighbours (prompt, answer) that the base model reproduces — every answer token
its most likely next token by a margin (trainer.answers_kept), teacher-forced: what greedy decoding says when
the answer comes first, and stays saying under bf16 rounding — are the guarded ones. After training and the recall rounds they are checked again in one batched forward. Any
that no longer comes out ("Every year, Halloween falls in the month of" → November, after July was forgotten
for Independence Day) is trained on by one more round: the request's pairs as before, the retain term on the
flipped neighbours, and a stop that needs both the forget criterion and those neighbours reproduced. The round
runs at most GUARD_STEPS steps (and the steps left); a round that does not meet both is undone (the adapter
stays as training left it), and the neighbours it could not put back are reported, not hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import lora
from .data import Encoder, Fact, make_batch
from .model import Transformer
from .plan import Pair, Plan
from .recall import ROUND_FACTOR, Rounds
from .settings import train_settings
from .trainer import KEPT_MARGIN, RunOptions, answers_kept, train_keeping_last_good


# the guard round's budget: a neighbour that a few steps cannot put back is one the forgetting needs to move
GUARD_STEPS = 12


@torch.no_grad()
def reproduces(model: Transformer, pairs: list[Pair], pad_id: int, margin: float = KEPT_MARGIN) -> list[bool]:
    """Per pair: is every answer token the model's most likely next token, teacher-forced, by `margin` nats?"""
    if not pairs:
        return []
    b = make_batch(pairs, pad_id).to(model.device)
    h = model(b.input_ids, return_hidden=True, select=b.sel)
    return answers_kept(h, model.head_weight, b.targets, b.seq, b.n_seq, margin).tolist()


@dataclass
class Guard:
    pairs: list[Pair]  # the neighbours the base model reproduces
    prompts: list[str]

    @classmethod
    def of(cls, model: Transformer, enc: Encoder, facts: list[Fact]) -> "Guard":
        """The listed neighbours of `facts` that the model (the base model: no adapter attached) reproduces."""
        listed = list(dict.fromkeys((p, t, f.chat) for f in facts for p, t in f.neighbors))
        pairs = [enc.pair(p, t, chat) for p, t, chat in listed]
        kept = reproduces(model, pairs, enc.pad_id)
        return cls([x for x, k in zip(pairs, kept) if k], [p for (p, _, _), k in zip(listed, kept) if k])

    def flipped(self, model: Transformer, pad_id: int) -> list[int]:
        return [i for i, ok in enumerate(reproduces(model, self.pairs, pad_id)) if not ok]


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
    settings = train_settings(s, steps=min(left, GUARD_STEPS), lr_scale=plan.lr_scale,
                              retain_until_kept=len(flipped))
    if s.mode == "suppress":  # the last recall round's threshold
        settings = replace(settings, stop_prob=s.stop_prob * ROUND_FACTOR ** rounds.rounds)
    params = lora.trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    more, error = train_keeping_last_good(model, data, settings, replace(run, checkpoint_dir=None, resume=False))
    if more.stopped != "criterion" or error is not None:
        # the forgetting and the neighbours could not both be had: the request's result stands as it was
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        report["still_flipped"] = report["flipped"]
        report["reverted"] = True
        return Rounds(rounds.outcome.then(more), rounds.rounds, rounds.error), report
    report["still_flipped"] = [guard.prompts[i] for i in guard.flipped(model, enc.pad_id)]
    return Rounds(rounds.outcome.then(more), rounds.rounds, error), report
