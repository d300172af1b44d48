"""Readers of the three record shapes; bad records reported with file, line and reason."""
import json

import pytest

from lune_fast.data import DataError, Encoder, make_batch, read_facts


def _write(tmp_path, lines, name="f.jsonl"):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


def test_facts_shape_with_bad_lines_reported(tmp_path):
    p = _write(tmp_path, [
        {"prompt": "The capital of France is", "target": "Paris", "replacement": "Lyon",
         "paraphrases": [{"prompt": "France's capital:", "known": True}, "Q: capital of France?\nA:"],
         "neighbors": [{"prompt": "The capital of Spain is", "target": "Madrid"}]},
        {"prompt": "The capital of Italy is"},
        '{"prompt": "broken", ',
        {"prompt": "x", "target": 5},
        {"prompt": "  ", "target": "y"},
        "",
        {"prompt": "The capital of Japan is", "target": "Tokyo"},
    ])
    r = read_facts(p)
    assert [f.target for f in r.facts] == ["Paris", "Tokyo"]
    f = r.facts[0]
    assert f.replacement == "Lyon" and f.paraphrases == ["France's capital:", "Q: capital of France?\nA:"]
    assert f.neighbors == [("The capital of Spain is", "Madrid")] and f.source == f"{p}:1"
    assert r.skipped == [
        f"{p}:2: field 'target' is missing",
        f"{p}:3: invalid JSON (Expecting property name enclosed in double quotes, column 22)",
        f"{p}:4: field 'target' must be a string, found int",
        f"{p}:5: field 'prompt' is empty",
    ]


def test_tofu_counterfact_rome_and_easyedit_shapes(tmp_path):
    recs = [
        {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "perturbed_answer": ["Marlowe"],
         "paraphrased_question": "Hamlet's author?"},
        {"requested_rewrite": {"prompt": "{} plays the sport of", "subject": "LeBron James",
                               "target_true": {"str": "basketball"}, "target_new": {"str": "football"}},
         "paraphrase_prompts": ["LeBron James is a professional"],
         "neighborhood_prompts": ["Michael Jordan plays the sport of"]},
        {"prompt": "Pete La Roca plays", "subject": "Pete La Roca", "ground_truth": "jazz", "target_new": "fantasy",
         "rephrase_prompt": "Pete La Roca is incredible at", "locality_prompt": "Otis Taylor plays",
         "locality_ground_truth": "jazz"},
    ]
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps(recs, indent=2))  # a JSON array
    facts = read_facts(p).facts
    tofu, rome, easy = facts
    assert tofu.chat and tofu.prompt == "Who wrote Hamlet?" and tofu.replacement == "Marlowe"
    assert tofu.paraphrases == ["Hamlet's author?"]
    assert rome.prompt == "LeBron James plays the sport of" and rome.target == "basketball"
    assert rome.replacement == "football" and rome.neighbors == [("Michael Jordan plays the sport of", "basketball")]
    assert easy.target == "jazz" and easy.replacement == "fantasy" and easy.neighbors == [("Otis Taylor plays", "jazz")]
    assert easy.source == f"{p}[2]"


def test_all_bad_empty_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match=r"no usable records \(.*:1: field 'target' is missing; .*:2: unrecognised"):
        read_facts(_write(tmp_path, [{"prompt": "a"}, {"foo": 1}]))
    with pytest.raises(DataError, match="no records"):
        read_facts(_write(tmp_path, [], name="empty.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "target": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_facts(bad)
    with pytest.raises(DataError, match="file not found"):
        read_facts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no usable records"):
        read_facts([{"prompt": "p", "target": ""}])


def test_encoder_leading_space_and_chat(tokenizer):
    enc = Encoder(tokenizer)
    p, a = enc.pair("The capital of France is", "Paris", chat=False)
    assert tokenizer.decode(p + a) == "The capital of France is Paris"
    p2, a2 = enc.pair("Q: capital?\nA: ", "Paris", chat=False)
    assert tokenizer.decode(a2) == "Paris"  # the prompt already ends in whitespace
    pc, ac = enc.pair("Who wrote Hamlet?", "Shakespeare", chat=True)
    text = tokenizer.decode(pc)
    assert "Who wrote Hamlet?" in text and text.rstrip().endswith("assistant")
    assert tokenizer.decode(ac) == "Shakespeare"


def test_make_batch_positions_predict_the_answer():
    pairs = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4]), ([10, 11], [12])]
    b = make_batch(pairs)
    flat = b.input_ids.reshape(-1)
    T = b.input_ids.shape[1]
    # the token after each selected position (within its row) is the target
    full = [p + a for p, a in pairs]
    for pos, tgt, s in zip(b.sel.tolist(), b.targets.tolist(), b.seq.tolist()):
        row, col = divmod(pos, T)
        assert row == s and full[row][col + 1] == tgt and flat[pos] == full[row][col]
    assert b.n_seq == 3 and b.n_tokens == 4 + 3 + 2


def test_packed_batch_matches_padded_log_probs(tmp_path):
    """Packing several sequences per row (block-diagonal attention, positions restarting) gives the same
    answer log-probs as one padded sequence per row."""
    import torch

    from conftest import make_tiny_hf
    from lune_fast import trainer
    from lune_fast.weights import load_model

    make_tiny_hf("llama", tmp_path)
    model = load_model(tmp_path)
    pairs = [([3, 17, 42, 9], [100, 7]), ([5, 6], [11, 12, 13]), ([88, 1, 2], [150]), ([4] * 9, [5, 6])]
    padded, packed = make_batch(pairs), make_batch(pairs, pack=12)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    out = []
    for b in (padded, packed):
        part = trainer._precompute(model, b, L0=1)
        tok = trainer.target_logprobs(trainer._hidden_at_answers(model, part, 1), model.head_weight, b.targets)
        order = torch.argsort(b.seq * 1000 + torch.arange(len(b.seq)), stable=True)
        out.append((tok[order], trainer._reference(model, part, 1)[order]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5) and torch.allclose(out[0][1], out[1][1], atol=1e-5)


def test_listed_neighbours_leave_out_forget_prompts_and_keep_repeats():
    """One rule for the three readers of listed neighbours (evaluation, preserved inputs, the guard): a neighbour
    that is a forget prompt of the request or of the `forgotten` facts is not a neighbour; repeats stay (the
    callers that count each prompt once dedupe)."""
    from lune_fast.data import Fact, listed_neighbors

    a = Fact("A is", "1", neighbors=[("B is", "2"), ("N is", "3"), ("N is", "3")])
    b = Fact("B is", "2", neighbors=[("A is", "1"), ("C is", "4"), ("M is", "5")])
    c = Fact("C is", "4")
    got = [(f.prompt, p, t) for f, p, t in listed_neighbors([a, b], forgotten=[c])]
    assert got == [("A is", "N is", "3"), ("A is", "N is", "3"), ("B is", "M is", "5")]
    assert [p for _, p, _ in listed_neighbors([b])] == ["A is", "C is", "M is"]  # A is not forgotten here
