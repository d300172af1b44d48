"""Retain anchors: the forget prompts' templates with other subjects, answered confidently by the base model."""
from lune_fast.anchors import build_anchors
from lune_fast.data import Encoder, Fact


def test_anchors_are_confident_base_answers_that_are_not_the_target(default_model, tokenizer):
    enc = Encoder(tokenizer)
    facts = [Fact(prompt="The capital city of Japan is", target="Tokyo"),
             Fact(prompt="The chemical symbol for gold is", target="Au")]
    anchors = build_anchors(default_model, enc, facts, per_fact=3, candidates=12, min_prob=0.3)
    assert 3 <= len(anchors) <= 6
    for a in anchors:
        assert a.prob >= 0.3 and a.answer and "tokyo" not in a.answer.lower()
        assert a.prompt.startswith(("The capital city of ", "The chemical symbol for "))
        assert a.prompt not in {f.prompt for f in facts}
    capitals = {a.prompt: a.answer for a in anchors if a.prompt.startswith("The capital city of")}
    assert capitals  # e.g. "The capital city of France is" -> "Paris"
