"""A request's peak memory and time under memory-saving variants.

The package's 32 facts forgotten at once (like for like: plain LoRA and NPO, as `bench e2e`; and the keyed
defaults): peak RSS over the request, the median step, then five one-fact requests on the same loaded model. Variants: "as is"; "head only" (float32: only
the head keeps a packed copy, kernels/frozen_linear.FLOAT32_MIN raised past every projection); "micro-batches"
(max_batch_tokens 512: the 32 facts in two micro-batches, each backpropagated at once). Each run is a fresh
process, the variants alternating within each repeat.

    python tools/experiments/memory_variants.py [--variants "as is,head only"] [--adapters plain,keyed]
        [--repeats 1] [--json OUT]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time


def one_run(variant: str, adapter: str) -> dict:
    import lune_fast.kernels.frozen_linear as fl

    if variant == "head only":
        fl.FLOAT32_MIN = 1 << 40  # the head (>= FLOAT32_LARGE) keeps its packed copy
    kw = {"adapter": "plain", "objective": "npo"} if adapter == "plain" else {}
    if variant == "micro-batches":
        kw["max_batch_tokens"] = 512
    from lune_fast.api import Unlearner
    from lune_fast.bench.harness import PeakRSS
    from lune_fast.bench.quality import load_records

    records = load_records(None, 32)
    u = Unlearner("default", **kw)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        r = u.forget(records, evaluate_before=False, evaluate_after=False, progress=False)
        wall = time.perf_counter() - t0
    ones = []
    for k in range(5):
        t0 = time.perf_counter()
        u.forget(records[k:k + 1], evaluate_before=False, evaluate_after=False, progress=False)
        ones.append(time.perf_counter() - t0)
    packed = sum(w._lune_packed[1].numel() * w.element_size() for m in u.model.modules()
                 for w in [getattr(m, "weight", None)] if w is not None and hasattr(w, "_lune_packed"))
    return {"variant": variant, "adapter": adapter, "dtype": str(u.dtype), "peak_rss_mb": round(mem.peak_mb),
            "time_to_unlearn": round(wall, 2), "steps": r.cost["steps"],
            "step_median": round(statistics.median(r.outcome.step_seconds), 3),
            "one_fact_median": round(statistics.median(ones), 3), "one_fact": [round(x, 3) for x in ones],
            "packed_mb_after": round(packed / 2**20)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="as is,head only")
    ap.add_argument("--adapters", default="plain,keyed")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one_run(*args.worker)))
        return 0
    rows = []
    for adapter in args.adapters.split(","):
        for _ in range(args.repeats):
            for variant in args.variants.split(","):
                out = subprocess.run([sys.executable, __file__, "--worker", variant, adapter], check=True,
                                     capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(["python", *sys.argv]), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
