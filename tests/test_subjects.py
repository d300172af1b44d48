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
