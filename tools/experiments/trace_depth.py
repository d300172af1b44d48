"""Where a model keeps the facts it knows: causal tracing (lune_fast.locate) per layer, as a share of the depth.

    python tools/experiments/trace_depth.py --model gemma3-270m --facts ../shared/data/facts-dev.jsonl --n 60 --json OUT

Keeps the facts whose prompt the model (float32, greedy) answers with the target, traces the first N of them and
prints each layer's effect (the share of the answer's lost probability that restoring the subject's last token
after that layer brings back: median and [0, 1]-clipped mean over the facts) and the best windows. The keyed
default's depth share (10%-30%) was chosen this way on SmolLM2 and checked on Gemma 3 270M (RESULTS.md 12).
"""
import argparse
import json

import torch

from lune_fast.data import Encoder, read_facts
from lune_fast.evaluate import Probe, answers_with, greedy_answers
from lune_fast.locate import choose_layers, trace_fact
from lune_fast.weights import load_model, load_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--facts", required=True)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--json")
    a = ap.parse_args()
    model, tok = load_model(a.model, dtype=torch.float32), load_tokenizer(a.model)
    enc = Encoder(tok)
    facts = read_facts(a.facts).facts
    gens = greedy_answers(model, enc, [Probe("forget", f.prompt, f.target) for f in facts])
    known = [f for f, g in zip(facts, gens) if answers_with(g, f.target)][:a.n]
    effects = torch.stack([e for i, f in enumerate(known) if (e := trace_fact(model, enc, f, seed=i)) is not None])
    L = effects.shape[1]
    rows = {"median": effects.median(0).values, "clipped_mean": effects.clamp(0, 1).mean(0)}
    print(f"{a.model}: {len(known)} known facts, {len(effects)} traced, {L} layers")
    print("| layer | share of depth | " + " | ".join(rows) + " |\n|---|---|" + "---|" * len(rows))
    for i in range(L):
        print(f"| {i} | {100 * i / L:.0f}% | " + " | ".join(f"{float(v[i]):.2f}" for v in rows.values()) + " |")
    for width in (5, 7):
        layers = choose_layers(rows["clipped_mean"], width)
        print(f"best {width}-layer window: {layers[0]}-{layers[-1]} "
              f"({100 * layers[0] / L:.0f}%-{100 * layers[-1] / L:.0f}% of the depth)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"model": a.model, "known": len(known), "traced": len(effects),
                       **{k: v.tolist() for k, v in rows.items()}}, fh)


if __name__ == "__main__":
    main()
