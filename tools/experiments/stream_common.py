"""What the stream diagnostics share (tools/experiments/neighbour_losses.py, stream_returns.py, ...): their arguments, a
stream of requests trained into a fresh state, handed back after each request, and a timer on a function."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def stream_arguments(doc: str, per_request: int, requests: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("facts")
    ap.add_argument("--per-request", type=int, default=per_request)
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--out")
    return ap.parse_args()


def timed_calls(module, name: str, counted=lambda args, kw: True) -> list[float]:
    """Replace module.name by a wrapper that appends the seconds of each call `counted` accepts to the list
    returned (clear it between requests)."""
    real, spent = getattr(module, name), []

    def timed(*args, **kw):
        t = time.perf_counter()
        out = real(*args, **kw)
        if counted(args, kw):
            spent.append(time.perf_counter() - t)
        return out

    setattr(module, name, timed)
    return spent


def read_records(path: str) -> list[dict]:
    """The facts file's records, read as the package reads a .jsonl (a bad line is named)."""
    from lune_fast.data import _json_lines

    return [obj for _, obj in _json_lines(Path(path))]


def each_request(u, records: list[dict], a: argparse.Namespace):
    """Yields (request index, its ForgetResult, the state after it, its seconds) for a.requests requests of
    a.per_request records, trained with a.settings into a state in a temporary folder."""
    from lune_fast.state import State

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "state"
        for i in range(a.requests):
            chunk = records[i * a.per_request:(i + 1) * a.per_request]
            if not chunk:
                return
            t0 = time.perf_counter()
            r = u.forget(chunk, into=folder, progress=False, evaluate_before=False, evaluate_after=False,
                         **json.loads(a.settings))
            yield i, r, State.open(folder), time.perf_counter() - t0
