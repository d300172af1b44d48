"""Recall as llama.cpp serves a GGUF: greedy answers from llama-cpp-python, scored as lune_fast scores its own.

Three steps, because llama-cpp-python and torch need not live in one environment:

    python tools/experiments/llama_cpp_recall.py probes --facts F.jsonl --n 32 --out probes.json          # lune_fast's venv
    python tools/experiments/llama_cpp_recall.py answer --gguf M.gguf --probes probes.json --out A.json   # llama-cpp-python
    python tools/experiments/llama_cpp_recall.py score --answers A.json [--base BASE.json]               # lune_fast's venv

`probes` lists what lune_fast's evaluation asks (lune_fast.evaluate.build_probes: the prompts, paraphrases and
the neighbours that are not forget prompts themselves); `answer` asks each as a raw completion (no chat
template, 24 tokens, temperature 0); `score` prints recall by kind as lune_fast scores it, over what the base
model's answers (--base) contained where given.
"""
from __future__ import annotations

import argparse
import json
import sys


def probes(a) -> None:
    from lune_fast.data import read_facts
    from lune_fast.evaluate import build_probes

    facts = read_facts(a.facts).facts[:a.n]
    out = [{"kind": p.kind, "prompt": p.prompt, "target": p.target} for p in build_probes(facts)]
    json.dump({"facts": a.facts, "n": len(facts), "probes": out}, open(a.out, "w"), indent=1)


def answer(a) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_ctx=256, n_threads=a.threads, seed=0, verbose=False)
    probes = json.load(open(a.probes))["probes"]
    for p in probes:
        out = llm(p["prompt"], max_tokens=24, temperature=0.0, top_k=1)
        p["answer"] = out["choices"][0]["text"]
    json.dump({"gguf": a.gguf, "probes": probes}, open(a.out, "w"), indent=1)


def score(a) -> None:
    from lune_fast.evaluate import answers_with

    probes = json.load(open(a.answers))["probes"]
    base = json.load(open(a.base))["probes"] if a.base else None
    for kind in ("forget", "paraphrase", "indirect", "neighbor"):
        idx = [i for i, p in enumerate(probes) if p["kind"] == kind and
               (base is None or kind == "forget" or answers_with(base[i]["answer"], p["target"]))]
        hits = sum(answers_with(probes[i]["answer"], probes[i]["target"]) for i in idx)
        print(f"{kind:10s} {hits}/{len(idx)} = {hits / max(len(idx), 1):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probes")
    p.add_argument("--facts", required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", required=True)
    x = sub.add_parser("answer")
    x.add_argument("--gguf", required=True)
    x.add_argument("--probes", required=True)
    x.add_argument("--threads", type=int, default=2)
    x.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("--answers", required=True)
    s.add_argument("--base")
    a = ap.parse_args(argv)
    {"probes": probes, "answer": answer, "score": score}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
