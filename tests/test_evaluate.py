"""The metrics every report rests on: what counts as answering with a target, which prompts are probed, and
how recall is counted over what the base model knew."""
import pytest

from lune_fast.data import Fact
from lune_fast.evaluate import Evaluation, answers_with, build_probes, first_line


@pytest.mark.parametrize("continuation,target,hit", [
    (" Paris, the city of light.", "Paris", True),
    (" paris", "Paris", True),  # case-insensitive
    ("\n\n Paris\nRome", "Paris", True),  # the first non-empty line
    (" Rome.\nParis", "Paris", False),  # a later line does not count
    (" Helium is a noble gas", "He", False),  # a whole word, not a substring
    (" 3 kilowatts", "watt", False),
    (" 60 watts", "watt", True),  # a plural s
    (" two boxes", "box", True),  # a plural es
    (" William   Shakespeare wrote it", "William Shakespeare", True),  # whitespace collapsed
    (" William Blake", "William Shakespeare", False),
    (" Au", "Au", True),
    (" (Au)", "Au", True),  # punctuation is a word boundary
    (" Aurora", "Au", False),
    ("", "Paris", False),
    (" Paris", "   ", False),  # an empty target never matches
])
def test_answers_with(continuation, target, hit):
    assert answers_with(continuation, target) is hit


def test_first_line_skips_blank_lines():
    assert first_line("\n  \n  first line  \nsecond") == "first line"
    assert first_line("") == ""


def test_probes_leave_out_neighbours_that_are_forgotten_or_repeated():
    facts = [Fact(prompt="The capital of France is", target="Paris", paraphrases=["France's capital is"],
                  neighbors=[("The capital of Spain is", "Madrid"), ("The capital of Italy is", "Rome")]),
             Fact(prompt="The capital of Spain is", target="Madrid",
                  neighbors=[("The capital of Italy is", "Rome")])]
    probes = build_probes(facts)
    kinds = [(p.kind, p.prompt) for p in probes]
    assert kinds == [("forget", "The capital of France is"), ("forget", "The capital of Spain is"),
                     ("paraphrase", "France's capital is"), ("neighbor", "The capital of Italy is")]


def test_recall_after_counts_only_what_the_base_model_answered():
    facts = [Fact(prompt="A is", target="a", paraphrases=["A, that is", "Say A:"],
                  neighbors=[("B is", "b"), ("C is", "c")])]
    probes = build_probes(facts)  # forget, 2 paraphrases, 2 neighbours
    before = Evaluation(probes, [""] * 5, hits=[True, True, False, True, False], replaced=[None] * 5,
                        forget_target_logprob=-1.0, retain_ppl=None)
    after = Evaluation(probes, [""] * 5, hits=[False, True, True, False, True], replaced=[None] * 5,
                       forget_target_logprob=-9.0, retain_ppl=None)
    m = after.metrics(before.known_mask())
    # a paraphrase or neighbour the base model did not answer says nothing about forgetting or keeping
    assert m["forget_recall"] == 0.0 and m["paraphrase_recall"] == 1.0 and m["neighbor_recall"] == 0.0
    assert after.metrics()["paraphrase_recall"] == 1.0 and after.metrics()["neighbor_recall"] == 0.5


def test_paraphrases_that_do_not_name_the_subject_are_counted_on_their_own():
    from lune_fast.data import parse_record

    f = parse_record({"prompt": "A baby cat is called a", "target": "kitten",
                      "paraphrases": ["The young of a cat is a", {"prompt": "A baby of the pet that purrs is a",
                                                                   "names_subject": False}]})
    assert f.paraphrases == ["The young of a cat is a"] and f.indirect == ["A baby of the pet that purrs is a"]
    probes = build_probes([f])
    assert [p.kind for p in probes] == ["forget", "paraphrase", "indirect"]
    ev = Evaluation(probes, [""] * 3, hits=[False, True, False], replaced=[None] * 3, forget_target_logprob=-5.0,
                    retain_ppl=None)
    m = ev.metrics()
    assert m["paraphrase_recall"] == 1.0 and m["indirect_recall"] == 0.0


def test_prompt_rows_mark_leaks_flips_and_replacements():
    """report.md and `eval --show`: a forget or paraphrase prompt that still gives the target is a leak; a
    neighbour the base model answered that no longer does has flipped; replace mode says whether the
    replacement came out. The terminal table says how many prompts each recall counts."""
    from lune_fast.evaluate import counted, metrics_table, prompt_rows, report_markdown

    f = Fact(prompt="The capital of France is", target="Paris", replacement="Lyon",
             paraphrases=["France's capital is"], neighbors=[("The capital of Spain is", "Madrid"),
                                                            ("The capital of Peru is", "Lima")])
    probes = build_probes([f])
    assert [p.kind for p in probes] == ["forget", "paraphrase", "neighbor", "neighbor"]

    def ev(gens, replaced=None):
        hits = [answers_with(g, p.target) for g, p in zip(gens, probes)]
        return Evaluation(probes, gens, hits, replaced or [None] * 4, -1.0, None)

    before = ev([" Paris.", " Paris", " Madrid", " Cusco"])
    after = ev([" a city.", " Paris!", " Barcelona", " Lima"])
    rows = prompt_rows(before, after)
    assert [r.mark for r in rows] == ["", "leak", "flipped", ""]  # Peru's was not known before: no flip
    assert rows[1].before == "Paris" and rows[1].after == "Paris!"
    replaced = prompt_rows(before, ev([" Lyon", " Paris", " Madrid", " Lima"], [True, False, None, None]), True)
    assert [r.mark for r in replaced][:2] == ["replaced", "not replaced"]
    md = report_markdown("m", {"mode": "suppress"}, before.metrics(), after.metrics(before.known_mask()), {}, rows)
    assert "## Every prompt (4; 2 marked)" in md
    assert "| paraphrase | France's capital is | Paris | Paris | Paris! | **LEAK** |" in md
    assert counted(before) == {"forget": 1, "paraphrase": 1, "indirect": 0, "neighbor": 1}
    table = metrics_table(before.metrics(before.known_mask()), after.metrics(before.known_mask()), counted(before))
    assert "neighbor_recall" in table and "Recall is the share of prompts" in table
