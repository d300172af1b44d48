"""Build the second validation set, lune_fast/assets/validation2.jsonl: facts the default model knows, written one
by one (tools/validation2_candidates.py: other relations than facts-dev's and the first validation set's, no
templates), each with three paraphrases in fixed styles that name the subject: a direct question ("Q: ...?\\nA:"), a
reordered statement, and the subject in another grammatical role.

    python tools/make_validation2.py                       # the default model -> lune_fast/assets/validation2.jsonl
    python tools/make_validation2.py --model gemma3-270m   # -> lune_fast/assets/gemma3-270m_validation2.jsonl

Nobody tunes on this file (benchmarks/RESULTS.md reports facts-dev | validation | validation-2).

Selection, as for the other sets: float32 model, greedy 24 new tokens, no chat template; a fact is kept when its
main prompt's first line answers with the target and no rival answer of its relation comes first
(make_validation.answers_first). Paraphrases carry `known` (same rule) and `style`. Neighbours: up to two kept facts
of the same relation and up to two about the same subject, none with this fact's target or replacement.
"""
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_validation import answers_first, model_and_out  # noqa: E402
from validation2_candidates import FACTS  # noqa: E402

from lune_fast.data import Encoder  # noqa: E402
from lune_fast.evaluate import Probe, first_line, greedy_answers  # noqa: E402
from lune_fast.weights import load_model, load_tokenizer  # noqa: E402

STYLES = ("question", "reordered", "object_role")


def main():
    args, out = model_and_out(__doc__.split("\n\n")[0], "validation2")
    model, enc = load_model(args.model), Encoder(load_tokenizer(args.model))
    rivals = {}
    for rel, _, _, target, repl, *_ in FACTS:
        rivals.setdefault(rel, set()).update((target, repl))
    probes = [Probe("forget", f[2], f[3]) for f in FACTS]
    probes += [Probe("paraphrase", p, f[3]) for f in FACTS for p in f[5:]]
    gens = greedy_answers(model, enc, probes)
    main_gens, para_gens = gens[:len(FACTS)], iter(gens[len(FACTS):])
    kept = []
    for (rel, subject, prompt, target, repl, *paras), g in zip(FACTS, main_gens):
        known = [answers_first(next(para_gens), target, sorted(rivals[rel]), p) for p in paras]
        if answers_first(g, target, sorted(rivals[rel]), prompt):
            kept.append({"relation": rel, "subject": subject, "prompt": prompt, "target": target,
                         "replacement": repl, "paraphrases": list(zip(STYLES, paras, known))})
        else:
            print(f"dropped: {prompt!r} -> {first_line(g)[:60]!r} (target {target!r})")
    rng = random.Random(2)
    records = []
    for c in kept:
        usable = [o for o in kept if o is not c and o["target"].lower() not in (c["target"].lower(),
                                                                                 c["replacement"].lower())]
        same_rel = [o for o in usable if o["relation"] == c["relation"]]
        same_subj = [o for o in usable if o["relation"] != c["relation"]
                     and o["subject"].lower() == c["subject"].lower()]
        rng.shuffle(same_rel)
        neighbors = [{"prompt": o["prompt"], "target": o["target"], "shares": "relation"} for o in same_rel[:2]]
        neighbors += [{"prompt": o["prompt"], "target": o["target"], "shares": "subject"} for o in same_subj[:2]]
        records.append({
            "id": f"{c['relation']}-{c['subject'].lower().replace(' ', '_')}", "category": c["relation"],
            "subject": c["subject"], "prompt": c["prompt"], "target": c["target"], "replacement": c["replacement"],
            "paraphrases": [{"prompt": p, "known": k, "names_subject": True, "style": st}
                            for st, p, k in c["paraphrases"]],
            "neighbors": neighbors})
    rng.shuffle(records)  # any prefix mixes relations
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"kept {len(records)}/{len(FACTS)} facts -> {out}")
    print(json.dumps(dict(Counter(r["category"] for r in records))))
    print("known paraphrases by style:", json.dumps(dict(Counter(
        p["style"] for r in records for p in r["paraphrases"] if p["known"]))))


if __name__ == "__main__":
    main()
