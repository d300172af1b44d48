"""What every benchmark here shares: medians of repeats in one process, peak resident memory, machine facts,
a table printer, atomic JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path


def median_seconds(fn, repeats: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(), "commit": _commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _commit(where: Path = Path(__file__).parent) -> str:
    """The checkout's HEAD, with "-dirty" when tracked files differ from it (the figures are then not that
    commit's)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, timeout=5)

    try:
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        if not head:
            return "unknown"
        return head + ("-dirty" if git("diff", "--quiet", "HEAD").returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    from ..io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def report(title: str, rows: list[dict], json_path: str | None = None, **extra) -> None:
    """Print the machine, the benchmark's one-line description and its table; with json_path, write them (and
    `extra`) there."""
    info = machine()
    print(info)
    print(title)
    print(markdown_table(rows))
    if json_path:
        write_json(json_path, {"machine": info, "rows": rows, **extra})


class PeakRSS:
    """Samples this process's resident memory every few ms; .peak_mb after stop()."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
