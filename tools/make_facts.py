"""Keep the candidate facts the default model knows and write lune_fast/assets/facts.jsonl.

    python tools/make_facts.py

Rule (DESIGN.md): greedy 24 new tokens, the first non-empty line answers with the target (whole word,
case-insensitive). A fact is kept when its main prompt passes; its paraphrases are kept as given (their
'known' flag records whether the model answers them); neighbours are up to three other kept facts of the
same relation with a different target.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from candidate_facts import CANDIDATES  # noqa: E402

from lune_fast.data import Encoder  # noqa: E402
from lune_fast.evaluate import answers_with, greedy_answers, Probe  # noqa: E402
from lune_fast.weights import load_model, load_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "lune_fast" / "assets" / "facts.jsonl"


def main():
    model, tok = load_model("default"), load_tokenizer("default")
    enc = Encoder(tok)
    probes = [Probe("forget", c[1], c[2]) for c in CANDIDATES]
    probes += [Probe("paraphrase", c[4], c[2]) for c in CANDIDATES]
    probes += [Probe("paraphrase", c[5], c[2]) for c in CANDIDATES]
    gens = greedy_answers(model, enc, probes)
    n = len(CANDIDATES)
    known = [answers_with(gens[i], CANDIDATES[i][2]) for i in range(n)]
    kept = [i for i in range(n) if known[i]]
    for i in range(n):
        if not known[i]:
            print(f"dropped: {CANDIDATES[i][1]!r} -> {gens[i][:60]!r}")
    records = []
    for i in kept:
        rel, prompt, target, repl, para, q = CANDIDATES[i]
        neigh = [CANDIDATES[j] for j in kept if j != i and CANDIDATES[j][0] == rel and
                 CANDIDATES[j][2] != target and CANDIDATES[j][2] != repl][:3]
        records.append({
            "id": f"{rel}-{len(records)}", "category": rel, "prompt": prompt, "target": target,
            "replacement": repl,
            "paraphrases": [{"prompt": para, "known": answers_with(gens[n + i], target)},
                            {"prompt": q, "known": answers_with(gens[2 * n + i], target)}],
            "neighbors": [{"prompt": c[1], "target": c[2]} for c in neigh],
        })
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"kept {len(records)}/{n} facts -> {OUT}")


if __name__ == "__main__":
    main()
