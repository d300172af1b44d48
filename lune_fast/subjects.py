"""Where a fact's subject is: found in the prompt (the record's own `subject`, the package's subject bank, or
the longest run of capitalised words), located in the prompt's tokens (inside a chat template too), and
swapped for other subjects of the same kind. Causal tracing (locate), anchors, keyed adapters and the
preserved prompts all read subjects through this module.
"""
from __future__ import annotations

import json
import random
import re
from functools import lru_cache

from .assets import asset
from .data import Encoder, Fact

_CONNECT = {"of", "de", "da", "van", "von", "the", "and", "la", "le", "del", "di", "du", "der"}
_GENERIC_FIRST = {"The", "A", "An", "In", "On", "Q", "What", "Who", "Which", "Where", "When", "How", "Why",
                  "Name", "Its", "This", "That", "It", "There"}


@lru_cache(maxsize=1)
def subject_bank() -> dict[str, list[str]]:
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


def prompt_offsets(enc: Encoder, fact: Fact) -> tuple[list[int], list[tuple[int, int]], int] | None:
    """(prompt ids as the trainer sees them, each token's character span, where fact.prompt starts in that
    text): a chat prompt (TOFU) is read inside its chat template. None if the template hides the prompt."""
    if not fact.chat:
        out = enc.tok(fact.prompt, return_offsets_mapping=True)
        return out["input_ids"], out["offset_mapping"], 0
    text = enc.prompt_text(fact.prompt, True)
    shift = text.rfind(fact.prompt)
    if shift < 0:
        return None
    out = enc.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return out["input_ids"], out["offset_mapping"], shift


def subject_last_token(enc: Encoder, fact: Fact) -> tuple[list[int], int, int] | None:
    """(prompt ids, first and last token index of the subject) or None when no subject is found."""
    found = _subject_span(enc, fact)
    return None if found is None else (list(found[0]), found[1], found[2])


def subject_text(enc: Encoder, fact: Fact) -> str | None:
    """The subject as the prompt's tokens spell it, or None when no subject is found."""
    found = _subject_span(enc, fact)
    return None if found is None else found[3]


# a lifelong state's next request looks up every earlier fact's subject again (keyed.subject_groups): ~2 ms a
# fact, seconds a request past a thousand facts, so each encoder keeps what it found, up to this many prompts
SUBJECTS_KEPT = 100_000


def _subject_span(enc: Encoder, fact: Fact) -> tuple[tuple[int, ...], int, int, str] | None:
    key = ("subject", fact.prompt, fact.subject, fact.chat)
    if key not in enc.memo:
        if len(enc.memo) >= SUBJECTS_KEPT:
            enc.memo.clear()
        enc.memo[key] = _find_subject_tokens(enc, fact)
    return enc.memo[key]


def _find_subject_tokens(enc: Encoder, fact: Fact) -> tuple[tuple[int, ...], int, int, str] | None:
    found = find_subject(fact.prompt, fact.subject)
    read = prompt_offsets(enc, fact) if found is not None else None
    if read is None:
        return None
    ids, offsets, shift = read
    start, end = found[0] + shift, found[1] + shift
    toks = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    if not toks:
        return None
    return tuple(ids), toks[0], toks[-1], enc.decode(ids[toks[0]:toks[-1] + 1]).strip()


# Words that say nothing about which fact a prompt is about (for prompts without a subject).
_FUNCTION_WORDS = set("""a an the of in on at to by for with from into onto and or but as is are was were be been being
its it this that these those there their his her which what who whom whose where when how why do does did
has have had called known name named type kind most more than also very q""".split())


def content_positions(enc: Encoder, f: Fact) -> tuple[list[int], list[int]]:
    """(prompt ids, positions of the last token of each content word of the prompt): the key of a fact with
    no subject is averaged over them ("A turtle is a type of" -> "turtle"), not read off the prompt's last
    token, which every prompt of the same template shares."""
    read = prompt_offsets(enc, f)
    if read is None:
        ids = enc.prompt_ids(f.prompt, f.chat)
        return ids, [len(ids) - 1]
    ids, offsets, shift = read
    ends = [m.end() + shift for m in re.finditer(r"[^\W\d_]{3,}", f.prompt)
            if m.group(0).lower() not in _FUNCTION_WORDS]
    positions = sorted({i for e in ends for i, (a, b) in enumerate(offsets) if a < e <= b})
    return ids, positions or [len(ids) - 1]
