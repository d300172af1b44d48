"""A request per process, as `lune-fast unlearn --into` runs them: what a fresh process pays on a grown state.

    .venv/bin/python tools/experiments/process_per_request.py FACTS.jsonl --earlier 96 --requests 5 [--state DIR]

Builds a state of the first --earlier facts, one fact a request, in one process (or copies --state, a state of
those facts); then trains each of the next --requests facts with a fresh Unlearner — nothing kept in memory,
whatever the moments store (LUNE_FAST_MOMENTS) holds read back, as a new process — and prints each request's
seconds and those of the earlier neighbours' moments. The model load is not counted.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from stream_common import read_records, timed_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("facts")
    ap.add_argument("--earlier", type=int, default=96)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--state", help="a state of the first --earlier facts, copied (else built)")
    a = ap.parse_args()
    from lune_fast import keyed
    from lune_fast.api import Unlearner

    records = read_records(a.facts)
    # the earlier neighbours' call (the only one with kept sums)
    spent = timed_calls(keyed, "group_moments", lambda args, kw: kw.get("cache") is not None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "state"
        if a.state:
            shutil.copytree(a.state, folder)
        else:
            u = Unlearner()
            for r in records[:a.earlier]:
                u.forget([r], into=folder, evaluate_before=False, evaluate_after=False, progress=False)
        for i, r in enumerate(records[a.earlier:a.earlier + a.requests]):
            u = Unlearner()
            spent.clear()
            t = time.perf_counter()
            u.forget([r], into=folder, evaluate_before=False, evaluate_after=False, progress=False)
            print(f"request {a.earlier + i + 1}: {time.perf_counter() - t:.2f} s, earlier neighbours "
                  f"{sum(spent):.2f} s", flush=True)


if __name__ == "__main__":
    main()
