"""Deployment as llama.cpp serves it: lune_fast's GGUF exports run by llama-server itself.

    make llama-cpp                       # builds llama-server once, from a pinned source (Makefile)
    lune-fast bench llamacpp [--server PATH] [--facts FILE] [--n 32] [--gemma-prompts 20] [--json OUT]

One adapter with the defaults on the first N facts of the validation set at once; then every answer greedy
(temperature 0, 24 tokens) as a raw completion, scored by lune_fast's recall rule (forget recall over every
forget prompt; paraphrase and neighbour recall over those the base alone answers):
- adapter: the GGUF LoRA adapter (`export --lora-gguf`) over the shipped Q4_1 base and over a Q8_0 base, on a
  server started with `--lora ADAPTER --lora-init-without-apply`: the base alone at scale 0, the adapter at
  scale 1 (`POST /lora-adapters`), and at scale 0 again (the facts come back);
- merged: the adapter merged into q4_1 and q4_0 exports (`export --gguf --quant`), against the base model
  exported at the same type;
- gemma: Gemma 3 270M's merged f32 export, its greedy answers against ours (float32) on --gemma-prompts prompts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .harness import machine, markdown_table, write_json

SERVER_ENV = "LUNE_FAST_LLAMA_SERVER"


def default_server() -> Path:
    """Where `make llama-cpp` puts llama-server (LUNE_FAST_LLAMA_SERVER overrides)."""
    from ..weights import cache_dir

    return Path(os.environ.get(SERVER_ENV) or cache_dir() / "llama.cpp" / "bin" / "llama-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on a model (and optionally a LoRA adapter, loaded unapplied) on a free local port, for the
    duration of a `with` block."""

    def __init__(self, binary: Path, model: Path, lora: Path | None = None, threads: int = 2, ctx: int = 512):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-c", str(ctx),
               "-t", str(threads), "-np", "1", "--no-webui"]
        if lora is not None:
            cmd += ["--lora", str(lora), "--lora-init-without-apply"]
        self.cmd = cmd

    def __enter__(self):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}): "
                                   f"{self.log.read().decode(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.3)
        raise RuntimeError("llama-server did not become ready in 120 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def _post(self, path: str, body) -> dict | list:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def complete(self, prompt: str, tokens: int = 24) -> str:
        out = self._post("/completion", {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "top_k": 1,
                                         "cache_prompt": False})
        return out["content"]

    def lora_scale(self, scale: float) -> None:
        self._post("/lora-adapters", [{"id": 0, "scale": scale}])


def recall(probes, answers: list[str], base: list[str] | None = None) -> dict:
    """Recall by kind as lune_fast scores it (answers_with), over what the base answered where given."""
    from ..evaluate import answers_with

    out = {}
    for kind in ("forget", "paraphrase", "neighbor"):
        idx = [i for i, p in enumerate(probes) if p.kind == kind and
               (base is None or kind == "forget" or answers_with(base[i], p.target))]
        out[kind] = sum(answers_with(answers[i], probes[i].target) for i in idx) / len(idx) if idx else None
        out[f"{kind}_n"] = len(idx)
    return out


def counted(r: dict) -> dict:
    """recall()'s figures under the rows' names, with the prompts each counted."""
    return {"forget": r["forget"], "forget_n": r["forget_n"], "paraphrase": r["paraphrase"],
            "paraphrase_n": r["paraphrase_n"], "neighbours_kept": r["neighbor"], "neighbours_kept_n": r["neighbor_n"]}


def answers(server: LlamaServer, probes) -> list[str]:
    return [server.complete(p.prompt) for p in probes]


def adapter_rows(binary: Path, bases: dict[str, Path], adapter_gguf: Path, probes) -> list[dict]:
    """The adapter over each base: base alone (scale 0), adapter (scale 1), base again (scale 0)."""
    rows = []
    for name, base in bases.items():
        with LlamaServer(binary, base, adapter_gguf) as srv:
            srv.lora_scale(0.0)
            alone = answers(srv, probes)
            srv.lora_scale(1.0)
            adapted = answers(srv, probes)
            srv.lora_scale(0.0)
            again = answers(srv, probes)
        r = recall(probes, adapted, alone)
        rows.append({"base": name, "deployed": "adapter (--lora)", **counted(r),
                     "base_forget": recall(probes, alone)["forget"],
                     "scale0_again_forget": recall(probes, again)["forget"], "scale0_again_same": again == alone,
                     "file_mib": adapter_gguf.stat().st_size / 2**20})
    return rows


def merged_rows(binary: Path, exports: dict[str, tuple[Path, Path]], probes) -> list[dict]:
    """Each merged export against the base model exported at the same type."""
    rows = []
    for quant, (base, merged) in exports.items():
        with LlamaServer(binary, base) as srv:
            alone = answers(srv, probes)
        with LlamaServer(binary, merged) as srv:
            adapted = answers(srv, probes)
        r = recall(probes, adapted, alone)
        rows.append({"base": f"{quant} export", "deployed": "merged (--gguf)", **counted(r),
                     "base_forget": recall(probes, alone)["forget"], "file_mib": merged.stat().st_size / 2**20})
    return rows


def gemma_row(binary: Path, tmp: Path, n_prompts: int) -> dict:
    """Gemma 3 270M exported f32 and served: its greedy answers against ours in float32."""
    import torch

    from ..evaluate import greedy
    from ..data import Encoder
    from ..export import write_gguf
    from ..weights import load_model, load_tokenizer, resolve_model_dir
    from .quality import load_records

    folder = resolve_model_dir("gemma3-270m")
    model = load_model(folder, dtype=torch.float32)
    out = write_gguf(model, folder, tmp / "gemma-f32.gguf", "f32")
    enc = Encoder(load_tokenizer(folder))
    prompts = [r["prompt"] for r in load_records(None, n_prompts)]
    ours = [enc.decode(g) for g in greedy(model, enc, [enc.prompt_ids(p, False) for p in prompts], 24)]
    with LlamaServer(binary, out) as srv:
        theirs = [srv.complete(p) for p in prompts]
    # our greedy stops after the first non-empty line (all recall reads); llama.cpp's runs the 24 tokens
    same = [b.startswith(a) for a, b in zip(ours, theirs)]
    return {"prompts": len(prompts), "same_greedy_answer": sum(same),
            "differ": [(p, a, b) for p, a, b, s in zip(prompts, ours, theirs, same) if not s]}


def run(binary: Path, facts: str | None, n: int, gemma_prompts: int, tmp: Path, only: str = "all",
        batches: int = 1) -> dict:
    """The adapter rows (`only` all, gguf or adapter), the merged rows (all, gguf or merged) and the Gemma check
    (all or gemma). `batches`: the first batches × n facts, n at a time, a row per batch and kind, pooled."""
    if only == "gemma":
        return {"rows": [], "pooled": [], "ours_full_precision": None, "facts": 0,
                "gemma": gemma_row(binary, tmp, gemma_prompts)}
    from ..api import Unlearner, asset
    from ..export import write_gguf
    from ..weights import find_default_gguf, load_model, resolve_model_dir

    records = [json.loads(x) for x in Path(facts or asset("validation.jsonl")).read_text().splitlines()]
    if len(records) < batches * n:
        raise SystemExit(f"--batches {batches} of --n {n} needs {batches * n} facts; the file has {len(records)}")
    folder = resolve_model_dir("default")
    base_model = load_model(folder)
    bases = {"Q4_1 (shipped)": find_default_gguf()}
    if only in ("all", "gguf", "adapter"):
        bases["Q8_0 (export)"] = write_gguf(base_model, folder, tmp / "base-q8_0.gguf", "q8_0")
    quants = ("q4_1", "q4_0") if only in ("all", "gguf", "merged") else ()
    merged_bases = {q: write_gguf(base_model, folder, tmp / f"base-{q}.gguf", q) for q in quants}
    del base_model
    u = Unlearner("default")
    rows, ours = [], []
    for b in range(batches):
        batch_rows, mine = run_batch(binary, u, records[b * n:(b + 1) * n], folder, tmp / f"batch{b}",
                                     bases if only in ("all", "gguf", "adapter") else {}, merged_bases)
        rows += [{**r, "batch": b} for r in batch_rows]
        ours.append(mine)
    return {"rows": rows, "pooled": pooled(rows) if batches > 1 else [], "ours_full_precision": ours,
            "facts": batches * n,
            "gemma": gemma_row(binary, tmp, gemma_prompts) if gemma_prompts and only == "all" else None}


def run_batch(binary: Path, u, records: list[dict], folder: Path, tmp: Path, bases: dict[str, Path],
              merged_bases: dict[str, Path]) -> tuple[list[dict], dict]:
    """One adapter with the defaults on `records` at once: its rows over `bases` (as a GGUF LoRA adapter) and
    merged into an export of each type of `merged_bases` (against that base), and our own recall."""
    from ..data import read_facts
    from ..evaluate import build_probes
    from ..export import merged_for_export, write_gguf, write_lora_gguf

    tmp.mkdir()
    result = u.forget(records, progress=False)
    adapter = result.save(tmp / "adapter")
    probes = build_probes(read_facts(records).facts)
    rows = adapter_rows(binary, bases, write_lora_gguf(adapter, tmp / "adapter.gguf"), probes) if bases else []
    exports = {}
    for quant, base in merged_bases.items():
        merged_model, edited = merged_for_export(folder, adapter, quant)
        exports[quant] = (base, write_gguf(merged_model, folder, tmp / f"merged-{quant}.gguf", quant, edited=edited))
    rows += merged_rows(binary, exports, probes)
    return rows, {k: result.after.get(f"{k}_recall") for k in ("forget", "paraphrase", "neighbor")}


def pooled(rows: list[dict]) -> list[dict]:
    """The batches' rows summed per (base, deployed): each recall over all the prompts it counted."""
    out: dict[tuple, dict] = {}
    for r in rows:
        p = out.setdefault((r["base"], r["deployed"]), {"base": r["base"], "deployed": r["deployed"], "batches": 0,
                                                        "hits": {}, "n": {}})
        p["batches"] += 1
        for kind, rate in (("forget", r["forget"]), ("paraphrase", r["paraphrase"]),
                           ("neighbours_kept", r["neighbours_kept"])):
            k = r[f"{kind}_n"]
            p["n"][kind] = p["n"].get(kind, 0) + k
            p["hits"][kind] = p["hits"].get(kind, 0) + round((rate or 0) * k)
    return [{"base": p["base"], "deployed": p["deployed"], "batches": p["batches"],
             **{kind: p["hits"][kind] / p["n"][kind] if p["n"][kind] else None for kind in p["n"]},
             **{f"{kind}_n": p["n"][kind] for kind in p["n"]}} for p in out.values()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, default=None, help=f"llama-server (default: {SERVER_ENV} or the cache's)")
    ap.add_argument("--facts", default=None, help="facts file (default: the package's validation set)")
    ap.add_argument("--n", type=int, default=32, help="facts forgotten at once")
    ap.add_argument("--gemma-prompts", type=int, default=20, help="prompts for the Gemma 3 check (0: skip it)")
    ap.add_argument("--batches", type=int, default=1,
                    help="forget the first BATCHES x N facts, N at a time: a row per batch, and the batches pooled")
    ap.add_argument("--only", choices=["all", "gguf", "adapter", "merged", "gemma"], default="all",
                    help="gguf: the adapter and merged rows (adapter, merged: one of them); gemma: the Gemma 3 check")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    binary = a.server or default_server()
    if not binary.exists():
        print(f"no llama-server at {binary}: run `make llama-cpp` (or pass --server)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        res = run(binary, a.facts, a.n, a.gemma_prompts, Path(tmp), a.only, a.batches)
    if res["rows"]:
        print(markdown_table(res["rows"]))
    if res["pooled"]:
        print(f"pooled over {a.batches} batches of {a.n}:")
        print(markdown_table(res["pooled"]))
    print("ours, full precision:", res["ours_full_precision"])
    if res["gemma"]:
        g = res["gemma"]
        print(f"Gemma 3 270M f32 export in llama.cpp: {g['same_greedy_answer']}/{g['prompts']} greedy answers as ours")
    if a.json:
        write_json(a.json, {"machine": machine(), "server": str(binary), **res})
    return 0
