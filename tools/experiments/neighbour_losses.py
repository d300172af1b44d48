"""Which request of a stream loses each listed neighbour: its own fact's request, or a later one?

    .venv/bin/python tools/experiments/neighbour_losses.py FACTS.jsonl --per-request 8 --requests 8 [--settings JSON] [--out F]

Trains the stream into a fresh state (default settings unless --settings) and, after every request, asks every
listed neighbour of all the stream's facts (greedy, the state on the model). A neighbour the base model answers
is "lost" at the first check it is not answered; it is charged to its own request when that is the request that
just landed, to a later request when its fact was already in the state, or "before its fact" otherwise;
"lost at the end" counts, by the same charges, those still lost after the last request.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from stream_common import each_request, read_records, stream_arguments


def main() -> None:
    a = stream_arguments(__doc__, per_request=8, requests=8)
    from lune_fast.api import Unlearner
    from lune_fast.data import listed_neighbors, read_facts
    from lune_fast.evaluate import answers_with, greedy

    u = Unlearner("default")
    records = read_records(a.facts)[:a.per_request * a.requests]
    facts = read_facts(records).facts
    owner = {}  # neighbour prompt -> (its request, target, chat)
    for i, f in enumerate(facts):
        for _, p, t in listed_neighbors([f], facts):
            owner.setdefault(p, (i // a.per_request, t, f.chat))
    prompts = list(owner)
    enc = u.encoder

    def answered() -> list[bool]:
        said = greedy(u.model, enc, [enc.prompt_ids(p, owner[p][2]) for p in prompts], u.defaults.max_new_tokens)
        return [answers_with(enc.decode(s), owner[p][1]) for p, s in zip(prompts, said)]

    base = answered()
    lost_at, now = {}, base
    for r, _, st, _ in each_request(u, records, a):
        with st.on(u.model):
            now = answered()
        for p, b, n in zip(prompts, base, now):
            if b and not n and p not in lost_at:
                lost_at[p] = r
        print(f"after request {r + 1}: {sum(b and not n for b, n in zip(base, now))} of {sum(base)} lost now",
              flush=True)
    def charged(p: str, r: int) -> str:  # to which request a neighbour lost after request r goes
        own = owner[p][0]
        return "own request" if r == own else "a later request" if r > own else "before its fact"

    last = dict(zip(prompts, now))
    charge = Counter(charged(p, r) for p, r in lost_at.items())
    at_end = Counter(charged(p, r) for p, r in lost_at.items() if not last[p])
    summary = {"neighbours answered by the base model": sum(base), "ever lost": len(lost_at), **charge,
               "lost at the end": dict(at_end),
               "lost": [{"prompt": p, "own_request": owner[p][0] + 1, "lost_after": r + 1, "at_end": not last[p]}
                        for p, r in lost_at.items()]}
    print(json.dumps({k: v for k, v in summary.items() if k != "lost"}))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
