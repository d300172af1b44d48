"""Redraw benchmarks/figures/frontier_facts32.png from sweep rows.

    python tools/experiments/plot_frontier.py [ROWS_DIR]

Every row of ROWS_DIR/*.jsonl (default: benchmarks/results) measured on the first 32 facts of facts-dev is one
point; the calibration runs of ../shared/research/calibration.md are the baseline (red crosses); the keyed
defaults of 2026-11-28 are the green stars. benchmarks/results keeps only the rows RESULTS.md cites; the whole
sweep the figure was drawn from is in git at commit 5f6ee5e:

    mkdir /tmp/rows && git archive 5f6ee5e benchmarks/results | tar -x -C /tmp/rows
    python tools/experiments/plot_frontier.py /tmp/rows/benchmarks/results
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from lune_fast.bench.quality import plot  # noqa: E402

RESULTS = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results"
# (label, forget, neighbours) of calibration.md's table
CALIBRATION = [
    ("npo 1e-3", 0.04, 0.05), ("npo 2e-4", 0.08, 0.08), ("npo all-7", 0.08, 0.14), ("ga", 0.38, 0.32),
    ("ul", 0.12, 0.11), ("npo+KL", 0.04, 0.08), ("npo+NLL", 0.08, 0.24), ("replace", 0.25, 0.51),
    ("replace+NLL", 0.33, 0.76),
]
# the chosen defaults: (file, setting) of the rows measured with the final code (the file's name before and after
# benchmarks/results was tidied)
CHOSEN = {(f, s): name for f in ("keyed_defaults.jsonl", "keyed_vs_plain_dev32.jsonl")
          for s, name in (("{}", "suppress default"), ('{"mode": "replace"}', "replace default"))}


def rows() -> list[dict]:
    out = []
    for path in sorted(RESULTS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("n") != 32 or "facts-dev" not in str(r.get("facts")):
                continue
            name = CHOSEN.get((path.name, r["setting"]))
            setting = json.dumps({"default": name}) if name else r["setting"]
            out.append({**r, "setting": setting})
    return out


def main() -> int:
    data = rows()
    chosen = tuple(dict.fromkeys(json.dumps({"default": name}) for name in CHOSEN.values()))
    target = ROOT / "benchmarks" / "figures" / "frontier_facts32.png"
    ok = plot(data, str(target), f"32 facts of facts-dev: {len(data)} settings", CALIBRATION, chosen)
    print(f"{len(data)} points -> {target}" if ok else "no plot")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
