"""Where paraphrase leaks come from: forget the first N facts of a records file with the defaults (at once, or one
per request), then sort the paraphrases the base model answered with the target by what still gives it: the
paraphrase's style (the record's `style`: question / reordered / object_role; else "question" for a Q: prompt and
"statement"), where the subject sits (the paraphrase's first words or later), and whether the leaked answer
restates the forget prompt's own words before the target.

    python tools/experiments/paraphrase_leaks.py --facts lune_fast/assets/validation2.jsonl --n 32 [--per-request]
        [--settings JSON] [--json OUT]
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from lune_fast.api import Unlearner
from lune_fast.bench.harness import write_json
from lune_fast.evaluate import first_line


def style_of(record: dict, prompt: str) -> str:
    for p in record.get("paraphrases", []):
        if isinstance(p, dict) and p.get("prompt") == prompt and p.get("style"):
            return p["style"]
    return "question" if prompt.startswith("Q:") else "statement"


def leaks(result, records: list[dict]) -> list[dict]:
    """One row per paraphrase the base model answered: its style, subject position, and the answer after."""
    before, after = result.evaluation_before, result.evaluation_after
    by_prompt = {p if isinstance(p, str) else p["prompt"]: r for r in records for p in r.get("paraphrases", [])}
    out = []
    for probe, was, hit, said in zip(after.probes, before.hits, after.hits, after.generations):
        if probe.kind != "paraphrase" or not was:
            continue
        rec = by_prompt.get(probe.prompt, {})
        subject = rec.get("subject") or ""
        words = " ".join(rec.get("prompt", "").split()[-3:])  # the forget prompt's last words
        out.append({"prompt": probe.prompt, "target": probe.target, "style": style_of(rec, probe.prompt),
                    "subject_first": bool(subject) and probe.prompt.lower().find(subject.lower()) <= 4,
                    "leak": hit, "said": first_line(said)[:80],
                    "restates": hit and bool(words) and words.lower() in said.lower()})
    return out


def summary(rows: list[dict]) -> dict:
    table = defaultdict(lambda: [0, 0])
    for r in rows:
        for key in (f"style={r['style']}", f"subject_first={r['subject_first']}", "all"):
            table[key][0] += r["leak"]
            table[key][1] += 1
    return {k: {"leaked": n, "known": d, "recall": n / d} for k, (n, d) in sorted(table.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--per-request", action="store_true")
    ap.add_argument("--settings", default="{}", help="JSON overrides of the defaults")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    records = [json.loads(line) for line in Path(a.facts).read_text().splitlines() if line.strip()][:a.n]
    u, overrides = Unlearner(), json.loads(a.settings)
    rows = []
    for batch in ([[r] for r in records] if a.per_request else [records]):
        try:
            rows += leaks(u.forget(batch, progress=False, **overrides), batch)
        except ValueError as e:  # a fact the model does not answer in this dtype: nothing to forget
            print(f"skipped: {e}", file=sys.stderr)
    s = summary(rows)
    for k, v in s.items():
        print(f"{k:28s} {v['leaked']:4d}/{v['known']:<4d} {v['recall']:.3f}")
    print("restating the forget prompt:", sum(r["restates"] for r in rows), "of", sum(r["leak"] for r in rows), "leaks")
    for r in rows:
        if r["leak"]:
            print(f"  [{r['style']}] {r['prompt']!r} -> {r['said']!r}")
    if a.json:
        write_json(a.json, {"facts": a.facts, "n": len(records), "per_request": a.per_request,
                            "settings": overrides, "summary": s, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
