"""What a fresh process pays before and during its first request (as each `lune-fast unlearn` does): the imports,
the model's load, the first one-fact request (the packed weights made, the moments read back from the store).

    .venv/bin/python tools/experiments/first_request.py FACTS.jsonl --index 1

Prints one JSON line: seconds of each part, and the request's steps. Run it several times (a new process each).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("facts")
    ap.add_argument("--index", type=int, default=1)
    a = ap.parse_args()
    from stream_common import read_records

    from lune_fast.api import Unlearner

    records = read_records(a.facts)
    t1 = time.perf_counter()
    u = Unlearner()
    t2 = time.perf_counter()
    r = u.forget(records[a.index:a.index + 1], evaluate_before=False, evaluate_after=False, progress=False)
    t3 = time.perf_counter()
    print(json.dumps({"imports": round(t1 - T0, 2), "load": round(t2 - t1, 2), "first_request": round(t3 - t2, 2),
                      "total": round(t3 - T0, 2), "steps": r.cost["steps"]}))


if __name__ == "__main__":
    main()
