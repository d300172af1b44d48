"""Retain anchors built from the forget prompts themselves.

Plain negative-example training forgets a whole category ("every 'main language spoken in X' becomes
English"). The counter-signal that protects neighbours is the same question about other subjects: for each
forget prompt, find its subject, put other subjects of the same kind in its place, keep the prompts the base
model answers confidently (and not with the forgotten answer), and train the adapter to keep those answers
(the base model's own greedy answer: self-distillation, no external data).

Subjects are found and swapped by lune_fast.subjects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .data import Encoder, Fact
from .evaluate import answers_with, greedy
from .model import Transformer
from .subjects import other_subject_prompts

_STOP = re.compile(r"[\n.,;:!?(]")


@dataclass
class Anchor:
    prompt: str
    answer_ids: list[int]
    answer: str
    prob: float  # the base model's mean token probability of its answer
    chat: bool = False


def build_anchors(model: Transformer, enc: Encoder, facts: list[Fact], per_fact: int = 2, candidates: int = 12,
                  min_prob: float = 0.5, seed: int = 0, max_new_tokens: int = 6) -> list[Anchor]:
    """Up to `per_fact` anchors per fact: same template, another subject, an answer the base model gives
    with mean token probability ≥ min_prob that does not answer with the fact's target. Run on the frozen
    model (call before attaching adapters)."""
    per = other_subject_prompts(facts, candidates, seed)
    flat = [(i, p) for i, ps in enumerate(per) for p in ps]
    if not flat:
        return []
    gens, logps = greedy(model, enc, [enc.prompt_ids(p, facts[i].chat) for i, p in flat], max_new_tokens,
                         return_logprobs=True)
    chosen: dict[int, list[Anchor]] = {}
    for (i, prompt), toks, lp in zip(flat, gens, logps):
        if len(chosen.get(i, [])) >= per_fact:
            continue
        cut = _answer_length(enc, toks)
        if cut == 0:
            continue
        answer = enc.decode(toks[:cut]).strip()
        prob = sum(2.718281828 ** x for x in lp[:cut]) / cut
        f = facts[i]
        if prob < min_prob or not answer or answers_with(answer, f.target) or \
                (f.replacement and answers_with(answer, f.replacement)):
            continue
        chosen.setdefault(i, []).append(Anchor(prompt, toks[:cut], answer, prob, f.chat))
    return [a for i in sorted(chosen) for a in chosen[i]]


def _answer_length(enc: Encoder, toks: list[int]) -> int:
    """Tokens of the answer proper: up to (not including) the first token that starts a new line or clause."""
    for k in range(len(toks)):
        text = enc.decode(toks[:k + 1])
        if _STOP.search(text.lstrip()):
            return k if k > 0 or text.strip() else 0
    return len(toks)
