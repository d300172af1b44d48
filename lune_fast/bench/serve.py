"""The deletion-request service under load (`lune-fast serve` in a process of its own, default model, a fresh state).

    lune-fast bench serve [--clients 16] [--seconds 120] [--requests 10] [--idle-requests 10] [--json OUT]

1. Load: `clients` threads send completions (greedy, 16 tokens) for `seconds`, asking the facts about to be
   forgotten and other prompts, while `requests` one-fact deletion requests land one after another (each sent
   once the previous is in force). Completion latency (p50, p99) and tokens/s while no request trains and while
   one does; errors; each request's time to in force; and whether any completion that started after its request
   was reported in force still gave the fact (read-your-writes: none may).
2. Idle: `idle-requests` one-fact requests, nothing else running: the time from the POST to "in force".
The facts are the package's validation set (never tuned on), taken in order among those the model answers.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .harness import machine, write_json


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Served:
    """`lune-fast serve` on a fresh state in a temporary folder, for a `with` block."""

    def __init__(self, tmp: Path, extra: list[str] = ()):
        self.port, self.tmp, self.extra = _port(), tmp, list(extra)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "lune_fast.cli", "serve", "--state",
                                      str(self.tmp / "state"), "--port", str(self.port), *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the service did not become ready")

    def memory_mb(self) -> dict:
        """The server's resident memory now and at its peak (VmRSS, VmHWM)."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                      if ":" in line)
        return {k: int(fields[v].split()[0]) / 1024 for k, v in (("rss_mb", "VmRSS"), ("peak_mb", "VmHWM"))}

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def known_facts(n: int) -> list[dict]:
    """The first n validation facts the default model answers (its own greedy answer gives the target)."""
    from ..api import asset
    from ..data import Encoder, read_facts
    from ..evaluate import answers_with, greedy
    from ..weights import load_model, load_tokenizer

    records = [json.loads(x) for x in asset("validation.jsonl").read_text().splitlines()]
    model, enc = load_model("default"), Encoder(load_tokenizer("default"))
    facts = read_facts(records).facts
    said = greedy(model, enc, [enc.prompt_ids(f.prompt, False) for f in facts], 24)
    keep = [{"prompt": f.prompt, "target": f.target} for f, s in zip(facts, said)
            if answers_with(enc.decode(s), f.target)]
    return keep[:n]


def _request(client, url: str, record: dict) -> tuple[str, float, float]:
    """POST one fact, poll until in force: (id, seconds to in force, the clock when the poll said so)."""
    t0 = time.monotonic()
    rid = client.post(url + "/v1/forget", json={"records": [record]}).json()["id"]
    while True:
        r = client.get(f"{url}/v1/requests/{rid}").json()
        if r["status"] in ("in_force", "failed"):
            now = time.monotonic()
            if r["status"] == "failed":
                raise RuntimeError(f"request {rid} failed: {r.get('error')}")
            return rid, now - t0, now
        time.sleep(0.02)


def load_phase(url: str, facts: list[dict], clients: int, seconds: float) -> dict:
    import httpx

    from ..evaluate import answers_with

    prompts = [f["prompt"] for f in facts] + ["The sky is", "My favourite food is", "Water boils at"]
    done: list[dict] = []  # one per completion: start, end, prompt, text, tokens, error
    training = []  # (start, end) of each request's training window, as the client saw it
    in_force = {}  # prompt -> the clock when its request was reported in force
    stop = threading.Event()
    lock = threading.Lock()

    def client(k: int):
        i = k
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                p = prompts[i % len(prompts)]
                i += clients
                t0 = time.monotonic()
                try:
                    r = c.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0})
                    ok = r.status_code == 200
                    body = r.json() if ok else {}
                    row = {"start": t0, "end": time.monotonic(), "prompt": p, "error": None if ok else r.status_code,
                           "text": body["choices"][0]["text"] if ok else "",
                           "tokens": body["usage"]["completion_tokens"] if ok else 0}
                except httpx.HTTPError as e:
                    row = {"start": t0, "end": time.monotonic(), "prompt": p, "error": repr(e), "text": "",
                           "tokens": 0}
                with lock:
                    done.append(row)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t_begin = time.monotonic()
    for t in threads:
        t.start()
    times = []
    with httpx.Client(timeout=120) as c:
        time.sleep(min(10.0, seconds / 6))  # a quiet start: the idle figures
        for f in facts:
            if time.monotonic() - t_begin > seconds:
                break
            t0 = time.monotonic()
            _, took, at = _request(c, url, f)
            training.append((t0, at))
            in_force[f["prompt"]] = at
            times.append(took)
    while time.monotonic() - t_begin < seconds:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    target = {f["prompt"]: f["target"] for f in facts}
    late = [d for d in done if d["prompt"] in in_force and d["start"] > in_force[d["prompt"]]
            and answers_with(d["text"], target[d["prompt"]])]

    def during(d):
        return any(a <= d["start"] <= b or a <= d["end"] <= b for a, b in training)

    ok = [d for d in done if d["error"] is None]
    out = {"completions": len(done), "errors": len(done) - len(ok), "deletion_requests": len(times),
           "to_in_force_p50_s": statistics.median(times) if times else None,
           "to_in_force_max_s": max(times, default=None),
           "honour_violations": len(late), "checked_after_in_force": sum(1 for d in done if d["prompt"] in in_force
                                                                         and d["start"] > in_force[d["prompt"]])}
    for name, sel in (("idle", [d for d in ok if not during(d)]), ("training", [d for d in ok if during(d)])):
        lat = [d["end"] - d["start"] for d in sel]
        span = sum(b - a for a, b in training) if name == "training" else seconds - sum(b - a for a, b in training)
        out[name] = {"completions": len(sel), "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99),
                     "tokens_per_s": sum(d["tokens"] for d in sel) / span if span > 0 else None}
    return out


def idle_phase(url: str, facts: list[dict]) -> dict:
    import httpx

    with httpx.Client(timeout=120) as c:
        times = [_request(c, url, f)[1] for f in facts]
    return {"requests": len(times), "p50_s": statistics.median(times), "p95_s": _pct(times, 0.95),
            "max_s": max(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--requests", type=int, default=10, help="deletion requests during the load")
    ap.add_argument("--idle-requests", type=int, default=10, help="one-fact requests on the idle service")
    ap.add_argument("--check-dtypes", default=None, help="the service's --check-dtypes (default: its default)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    extra = ["--check-dtypes", a.check_dtypes] if a.check_dtypes else []
    facts = known_facts(a.requests + a.idle_requests)
    with tempfile.TemporaryDirectory() as tmp:
        with Served(Path(tmp) / "load", extra) as s:
            load = load_phase(s.url, facts[:a.requests], a.clients, a.seconds)
            load["server_memory"] = s.memory_mb()
        with Served(Path(tmp) / "idle", extra) as s:
            ready = s.memory_mb()
            idle = idle_phase(s.url, facts[a.requests:])
            idle["server_memory_ready"], idle["server_memory_after"] = ready, s.memory_mb()
    res = {"load": load, "idle_requests": idle, "clients": a.clients, "seconds": a.seconds,
           "check_dtypes": a.check_dtypes}
    print(json.dumps(res, indent=2))
    if a.json:
        write_json(a.json, {"machine": machine(), **res})
    return 0
