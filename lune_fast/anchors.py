"""Retain anchors built from the forget prompts themselves.

Plain negative-example training forgets a whole category ("every 'main language spoken in X' becomes
English"). The counter-signal that protects neighbours is the same question about other subjects: for each
forget prompt, find its subject, put other subjects of the same kind in its place, keep the prompts the base
model answers confidently (and not with the forgotten answer), and train the adapter to keep those answers
(the base model's own greedy answer: self-distillation, no external data).

Subjects come from the record (`subject`, CounterFact) or are found in the prompt: the longest entry of the
package's subject bank (assets/subjects.json), else the longest run of capitalised words.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from .data import Encoder, Fact
from .evaluate import answers_with
from .model import Transformer, generate

_CONNECT = {"of", "de", "da", "van", "von", "the", "and", "la", "le", "del", "di", "du", "der"}
_GENERIC_FIRST = {"The", "A", "An", "In", "On", "Q", "What", "Who", "Which", "Where", "When", "How", "Why",
                  "Name", "Its", "This", "That", "It", "There"}
_STOP = re.compile(r"[\n.,;:!?(]")


@lru_cache(maxsize=1)
def subject_bank() -> dict[str, list[str]]:
    from .api import asset

    return json.loads(asset("subjects.json").read_text())


def _bank_index() -> list[tuple[str, str]]:
    return sorted(((name, kind) for kind, names in subject_bank().items() for name in names),
                  key=lambda e: -len(e[0]))


def find_subject(prompt: str, subject: str | None = None) -> tuple[int, int, str | None] | None:
    """(start, end, kind) of the subject in the prompt, or None. kind is the bank category when known."""
    if subject:
        i = prompt.find(subject)
        if i >= 0:
            kind = next((k for n, k in _bank_index() if n.lower() == subject.lower()), None)
            return i, i + len(subject), kind
    low = prompt.lower()
    for name, kind in _bank_index():
        for m in re.finditer(r"(?<!\w)" + re.escape(name.lower()) + r"(?!\w)", low):
            return m.start(), m.end(), kind
    best = None
    for m in re.finditer(r"[A-Z][\w'\-]*(?:\s+(?:(?:%s)\s+)*[A-Z][\w'\-]*)*" % "|".join(_CONNECT), prompt):
        text = m.group(0)
        if m.start() == 0 and text in _GENERIC_FIRST:
            continue
        if m.start() == 0 and text.split()[0] in _GENERIC_FIRST:  # "The Great Gatsby" keeps "Great Gatsby"
            first = text.split()[0]
            start = m.start() + len(first) + 1
            text = text[len(first) + 1:]
            if not text:
                continue
            span = (start, start + len(text))
        else:
            span = (m.start(), m.end())
        if best is None or span[1] - span[0] > best[1] - best[0]:
            best = span
    return (best[0], best[1], None) if best else None


def candidate_prompts(fact: Fact, rng: random.Random, n: int) -> list[str]:
    found = find_subject(fact.prompt, fact.subject)
    if found is None:
        return []
    start, end, kind = found
    current = fact.prompt[start:end].lower()
    bank = subject_bank()
    pool = list(bank[kind]) if kind else [s for names in bank.values() for s in names]
    avoid = [t.lower() for t in (fact.target, fact.replacement) if t]
    pool = [s for s in pool if s.lower() != current and not any(a in s.lower() or s.lower() in a for a in avoid)]
    rng.shuffle(pool)
    return [fact.prompt[:start] + s + fact.prompt[end:] for s in pool[:n]]


def other_subject_prompts(facts: list[Fact], n: int, seed: int = 0) -> list[list[str]]:
    """Per fact, up to n of its prompts with other subjects, none of them a forget prompt itself."""
    rng = random.Random(seed)
    forget_prompts = {f.prompt for f in facts}
    return [[p for p in candidate_prompts(f, rng, n) if p not in forget_prompts] for f in facts]


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
    ids = [enc.prompt_ids(p, facts[i].chat) for i, p in flat]
    pad = enc.tok.pad_token_id if enc.tok.pad_token_id is not None else 0
    gens, logps = [], []
    for b in range(0, len(ids), 64):
        g, lp = generate(model, ids[b:b + 64], max_new_tokens, eos_token_id=enc.tok.eos_token_id, pad_token_id=pad,
                         return_logprobs=True)
        gens += g
        logps += lp
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
