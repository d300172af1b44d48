"""Which forgotten facts of a stream come back, and how: the line that says the target again.

    .venv/bin/python tools/experiments/stream_returns.py FACTS.jsonl --per-request 1 --requests 100 [--settings JSON] [--out F]

Trains the stream into a fresh state (default settings unless --settings) and, after every request, asks every
earlier fact's prompt (greedy, the state on the model). A fact is "returned" when it says its target again after
a check where it did not; each returned fact is written with the line it says now and the one it said when last
gone (one JSON line per request).
"""
from __future__ import annotations

import json

from stream_common import each_request, read_records, stream_arguments


def main() -> None:
    a = stream_arguments(__doc__, per_request=1, requests=100)
    from lune_fast.api import Unlearner
    from lune_fast.evaluate import answers_with, greedy

    records = read_records(a.facts)
    u = Unlearner()
    done, gone_at, last_line = [], {}, {}
    with open(a.out if a.out else "/dev/null", "w") as out:
        for i, r, st, seconds in each_request(u, records, a):
            done += r.facts
            with st.on(u.model):
                said_ids = greedy(u.model, u.encoder, [u.encoder.prompt_ids(f.prompt, f.chat) for f in done],
                                  u.defaults.max_new_tokens)
            row = {"request": i + 1, "facts": len(done), "seconds": round(seconds, 2), "steps": r.cost["steps"],
                   "returned": []}
            for j, (f, line) in enumerate(zip(done, map(u.encoder.decode, said_ids))):
                said = answers_with(line, f.target)
                if said and f.prompt in gone_at:
                    row["returned"].append({"fact": j + 1, "prompt": f.prompt, "target": f.target, "now": line,
                                            "when_gone": last_line[f.prompt], "first_gone_at": gone_at[f.prompt]})
                elif not said:
                    gone_at.setdefault(f.prompt, i + 1)
                    last_line[f.prompt] = line
            print(json.dumps({k: row[k] for k in ("request", "facts", "seconds", "steps")}),
                  [x["prompt"] for x in row["returned"]], flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
