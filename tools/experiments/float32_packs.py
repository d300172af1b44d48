"""What float32's packed copies of the layers' projections cost and give (a CPU where `--dtype auto` is float32):
the package's 32 facts forgotten at once (like for like: plain LoRA and NPO, as `bench e2e`; and the keyed
defaults), peak RSS over the request, then five one-fact requests on the same loaded model; with the packing of
every projection as it is, and with only the head packed (kernels/frozen_linear.FLOAT32_MIN raised past every
projection). Each run is a fresh process, the variants alternating.

    python tools/experiments/float32_packs.py [--json OUT]
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
    from lune_fast.api import Unlearner
    from lune_fast.bench.harness import PeakRSS
    from lune_fast.bench.quality import load_records

    records = load_records(None, 32)
    u = Unlearner("default", **({"adapter": "plain", "objective": "npo"} if adapter == "plain" else {}))
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
            "one_fact_median": round(statistics.median(ones), 3), "one_fact": [round(x, 3) for x in ones],
            "packed_mb_after": round(packed / 2**20)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one_run(*args.worker)))
        return 0
    rows = []
    for adapter in ("plain", "keyed"):
        for variant in ("as is", "head only"):
            out = subprocess.run([sys.executable, __file__, "--worker", variant, adapter], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": "python tools/experiments/float32_packs.py", "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
