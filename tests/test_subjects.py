"""Finding a fact's subject in its prompt (and its tokens), and swapping it for other subjects."""
import random

import pytest

from lune_fast.data import Encoder, Fact
from lune_fast.subjects import candidate_prompts, find_subject, subject_last_token


@pytest.mark.parametrize("prompt,subject,kind", [
    ("The main language spoken in Turkey is", "Turkey", "country"),
    ("The chemical symbol for gold is", "gold", "element"),
    ("The novel Nineteen Eighty-Four was written by", "Nineteen Eighty-Four", "work"),
    ("Ada Byron wrote notes on the engine of", "Ada Byron", None),
])
def test_find_subject(prompt, subject, kind):
    start, end, k = find_subject(prompt)
    assert prompt[start:end] == subject and k == kind


def test_candidates_keep_the_template_and_change_the_subject():
    f = Fact(prompt="The capital city of Japan is", target="Tokyo")
    cands = candidate_prompts(f, random.Random(0), 8)
    assert len(cands) == 8 and len(set(cands)) == 8
    for c in cands:
        assert c.startswith("The capital city of ") and c.endswith(" is") and "Japan" not in c
    assert candidate_prompts(Fact(prompt="water boils when heated and it", target="x"), random.Random(0), 4) == []


def test_a_chat_prompt_has_its_subject_found_inside_the_template(tokenizer):
    enc = Encoder(tokenizer)
    f = Fact(prompt="Where would you find the Eiffel Tower?", target="Paris", chat=True)
    ids, first, last = subject_last_token(enc, f)
    assert ids == enc.prompt_ids(f.prompt, True)  # the templated prompt the trainer sees
    assert enc.decode(ids[first:last + 1]).strip().endswith("Eiffel Tower")


def test_an_encoder_looks_a_prompts_subject_up_once_within_its_bound(tokenizer, monkeypatch):
    """A lifelong state asks for every earlier fact's subject on each request: the encoder keeps what it found
    (ids handed out as fresh lists, so a caller cannot change what is kept), keyed by everything that decides it
    (prompt, given subject, chat), and starts over past subjects.SUBJECTS_KEPT prompts."""
    from lune_fast import subjects

    enc = Encoder(tokenizer)
    calls = []
    real = subjects.find_subject
    monkeypatch.setattr(subjects, "find_subject", lambda *a: calls.append(a) or real(*a))
    f = Fact(prompt="The main language spoken in Turkey is", target="Turkish")
    first = subject_last_token(enc, f)
    first[0].append(-1)
    assert subject_last_token(enc, f) == (first[0][:-1], first[1], first[2]) and len(calls) == 1
    assert subjects.subject_text(enc, f) == "Turkey" and len(calls) == 1
    assert subjects.subject_text(enc, Fact(prompt=f.prompt, target="x", subject="Turkey")) == "Turkey"
    assert subjects.subject_text(enc, Fact(prompt=f.prompt, target="x", chat=True)) == "Turkey"
    assert len(calls) == 3
    monkeypatch.setattr(subjects, "SUBJECTS_KEPT", 3)
    subjects.subject_text(enc, Fact(prompt="The capital of Egypt is", target="Cairo"))
    assert len(enc.memo) == 1 and len(calls) == 4
