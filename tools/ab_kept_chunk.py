"""The earlier neighbours' kept-sums chunk, A/B in one process: two Unlearners, each on its own copy of a state,
requests alternating between them, one with preserve.KEPT_CHUNK = A and one with B.

    .venv/bin/python tools/ab_kept_chunk.py STATE FACTS.jsonl --first 100 --requests 8 [--chunks 64,8] [--dtype float32]

STATE: a state (copied twice, never changed); FACTS: records from --first on are the requests (one fact each;
the first is a warm-up for each side). Prints each request's seconds and those of the preserved inputs, and the
medians.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from stream_common import read_records, timed_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state")
    ap.add_argument("facts")
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--chunks", default="64,8")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    from lune_fast import api, preserve
    from lune_fast.api import Unlearner

    records = read_records(a.facts)
    spent = timed_calls(api, "preserved_inputs")
    chunks = [int(c) for c in a.chunks.split(",")]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in chunks:  # an Unlearner each: their in-process kept sums stay apart
            folder = Path(tmp) / f"state{c}"
            shutil.copytree(a.state, folder)
            preserve.KEPT_CHUNK = c
            u = Unlearner(dtype=a.dtype)
            u.forget(records[a.first:a.first + 1], into=folder, evaluate_before=False, evaluate_after=False,
                     progress=False)
            runs[c] = (u, folder, [], [])
        for r in records[a.first + 1:a.first + 1 + a.requests]:
            for c, (u, folder, total, prep) in runs.items():
                preserve.KEPT_CHUNK = c
                spent.clear()
                t = time.perf_counter()
                out = u.forget([r], into=folder, evaluate_before=False, evaluate_after=False, progress=False)
                total.append(time.perf_counter() - t)
                prep.append(sum(spent))
                print(f"chunk {c}: {total[-1]:.2f} s, preserved inputs {prep[-1]:.2f} s, {out.cost['steps']} steps",
                      flush=True)
    for c, (_, _, total, prep) in runs.items():
        print(f"chunk {c}: median request {statistics.median(total):.2f} s, preserved inputs "
              f"{statistics.median(prep):.3f} s")


if __name__ == "__main__":
    main()
