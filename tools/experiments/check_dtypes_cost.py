"""What the float32 check costs a one-fact request: the first N facts of a set, each forgotten alone with
check_dtypes "none" and with the default (float32 for a bf16 run), alternating in one process (model loaded,
no evaluation); medians of the wall times.

    python tools/experiments/check_dtypes_cost.py [--facts validation2.jsonl] [--n 16]
"""
import argparse
import json
import statistics
import time

from lune_fast.api import Unlearner
from lune_fast.assets import asset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", default="validation2.jsonl", help="a set the package ships")
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    records = [json.loads(line) for line in asset(a.facts).read_text().splitlines()][:a.n]
    u = Unlearner("default")
    u.forget(records[:1], progress=False, evaluate_before=False, evaluate_after=False)  # the process's first request
    times = {"none": [], "float32": []}
    for r in records:
        for mode in times:
            t0 = time.perf_counter()
            u.forget([r], progress=False, evaluate_before=False, evaluate_after=False, check_dtypes=mode)
            times[mode].append(time.perf_counter() - t0)
    for mode, v in times.items():
        print(f"check_dtypes={mode}: median {statistics.median(v):.3f} s, mean {statistics.mean(v):.3f} s")
    print(f"ratio of medians: {statistics.median(times['float32']) / statistics.median(times['none']):.2f}")


if __name__ == "__main__":
    main()
