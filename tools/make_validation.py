"""Build the validation set, lune_fast/assets/validation.jsonl: facts the default model knows, from relations
and templates that facts-dev does not use (tools/validation_candidates.py), with paraphrases and neighbours.

    python tools/make_validation.py                       # the default model -> lune_fast/assets/validation.jsonl
    python tools/make_validation.py --model gemma3-270m   # -> lune_fast/assets/gemma3-270m_validation.jsonl

Nobody tunes on this file: every default is chosen on facts-dev and reported here (benchmarks/RESULTS.md).

Rule, as for facts-dev: float32 model, greedy 24 new tokens, no chat template. A fact is kept when the first
non-empty line of its main prompt's continuation answers with the target (lune_fast.evaluate.answers_with) and
no rival answer of its relation (another candidate's target or replacement, not named in the prompt) comes
first in that line. Paraphrases are kept with a `known` flag (same rule); a paraphrase that describes the
subject instead of naming it has `names_subject: false`. Neighbours are other kept facts: up to two of the same
relation and up to two about the same subject (other relations), none with this fact's target or replacement,
each marked with what it shares.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from validation_candidates import DESCRIPTIONS, RELATIONS, SUBJECT_OF  # noqa: E402

from lune_fast.data import Encoder  # noqa: E402
from lune_fast.evaluate import Probe, answers_with, first_line, greedy_answers  # noqa: E402
from lune_fast.weights import load_model, load_tokenizer  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "lune_fast" / "assets"


def fill(template: str, subject: str) -> str:
    text = template.format(s=subject)
    return text[0].upper() + text[1:]


def first_at(line: str, answer: str) -> int | None:
    m = re.search(r"(?<!\w)" + re.escape(" ".join(answer.lower().split())) + r"(?:s|es)?(?!\w)", line)
    return m.start() if m else None


def answers_first(generation: str, target: str, rivals: list[str], prompt: str) -> bool:
    """answers_with, and no rival answer of the relation (not named in the prompt) before the target."""
    if not answers_with(generation, target):
        return False
    line = " ".join(first_line(generation).lower().split())
    at = first_at(line, target)
    return not any((r_at := first_at(line, r)) is not None and r_at < at
                   for r in rivals if r.lower() != target.lower() and r.lower() not in prompt.lower())


def model_and_out(description: str, name: str) -> tuple[argparse.Namespace, Path]:
    """A set builder's --model and --out; by default the set goes to the package's assets, as NAME.jsonl for the
    default model and MODEL_NAME.jsonl for another."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="default", help="'default', 'gemma3-270m' or a model folder")
    ap.add_argument("--out", help=f"default: lune_fast/assets/{name}.jsonl (default model) or "
                                  f"lune_fast/assets/MODEL_{name}.jsonl")
    args = ap.parse_args()
    out = Path(args.out) if args.out else ASSETS / (
        f"{name}.jsonl" if args.model == "default" else f"{Path(args.model).name}_{name}.jsonl")
    return args, out


def main():
    args, out = model_and_out(__doc__.split("\n\n")[0], "validation")
    model, tok = load_model(args.model), load_tokenizer(args.model)
    enc = Encoder(tok)
    cands = []
    for rel, (template, para_templates, rows) in RELATIONS.items():
        rivals = sorted({x for _, t, r in rows for x in (t, r)})
        for subject, target, repl in rows:
            paras = [(fill(t, subject), True) for t in para_templates]
            if subject in DESCRIPTIONS:
                paras.append((fill(template, DESCRIPTIONS[subject]), False))
            cands.append({"relation": rel, "subject": subject, "prompt": fill(template, subject), "target": target,
                          "replacement": repl, "paraphrases": paras, "rivals": rivals})
    probes = [Probe("forget", c["prompt"], c["target"]) for c in cands]
    probes += [Probe("paraphrase", p, c["target"]) for c in cands for p, _ in c["paraphrases"]]
    gens = greedy_answers(model, enc, probes)
    main_gens, para_gens = gens[:len(cands)], iter(gens[len(cands):])
    kept = []
    for c, g in zip(cands, main_gens):
        c["para_known"] = [answers_first(next(para_gens), c["target"], c["rivals"], p) for p, _ in c["paraphrases"]]
        if answers_first(g, c["target"], c["rivals"], c["prompt"]):
            kept.append(c)
        else:
            print(f"dropped: {c['prompt']!r} -> {first_line(g)[:60]!r} (target {c['target']!r})")
    rng = random.Random(0)
    records = []
    for c in kept:
        who = SUBJECT_OF.get(c["subject"], c["subject"]).lower()
        usable = [o for o in kept if o is not c and o["target"].lower() not in (c["target"].lower(),
                                                                                 c["replacement"].lower())]
        same_rel = [o for o in usable if o["relation"] == c["relation"]]
        same_subj = [o for o in usable if o["relation"] != c["relation"]
                     and SUBJECT_OF.get(o["subject"], o["subject"]).lower() == who]
        rng.shuffle(same_rel)
        neighbors = [{"prompt": o["prompt"], "target": o["target"], "shares": "relation"} for o in same_rel[:2]]
        neighbors += [{"prompt": o["prompt"], "target": o["target"], "shares": "subject"} for o in same_subj[:2]]
        records.append({
            "id": f"{c['relation']}-{who.replace(' ', '_')}", "category": c["relation"], "subject": c["subject"],
            "prompt": c["prompt"], "target": c["target"], "replacement": c["replacement"],
            "paraphrases": [{"prompt": p, "known": k, "names_subject": named}
                            for (p, named), k in zip(c["paraphrases"], c["para_known"])],
            "neighbors": neighbors})
    rng.shuffle(records)  # any prefix mixes relations
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    by_rel = {}
    for r in records:
        by_rel[r["category"]] = by_rel.get(r["category"], 0) + 1
    print(f"kept {len(records)}/{len(cands)} facts -> {out}")
    print(json.dumps(by_rel))


if __name__ == "__main__":
    main()
