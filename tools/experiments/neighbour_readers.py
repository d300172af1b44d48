"""Which ranks of a lifelong state read each listed neighbour it lost.

    .venv/bin/python tools/experiments/neighbour_readers.py STATE FACTS.jsonl [--out F]

For every listed neighbour of the state's facts (FACTS.jsonl: the records the state was built from, in order)
that the base model answers and the state does not (greedy, as `eval` asks), prints where its line parts from
the base model's and the three ranks that read its prompt the most: max over its positions and the adapted
layers of |a_i · x| (a rank answers 1 to its own subject's key). The same figures for the neighbours kept give the
comparison (medians at the end).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from stream_common import read_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state")
    ap.add_argument("facts")
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch

    from lune_fast import lora
    from lune_fast.api import Unlearner
    from lune_fast.data import listed_neighbors, read_facts
    from lune_fast.evaluate import answers_with, greedy
    from lune_fast.model import AttnMask
    from lune_fast.state import State

    u = Unlearner()
    enc, st = u.encoder, State.open(a.state)
    said = [r["prompt"] for e in st.entries if e.get("op") == "forget" for r in e["records"]]
    facts = [f for f in read_facts(read_records(a.facts)).facts if f.prompt in set(said)]
    owner = {p: (t, f.chat) for f, p, t in reversed(listed_neighbors(facts))}
    prompts = list(owner)
    ids = [enc.prompt_ids(p, owner[p][1]) for p in prompts]
    base = greedy(u.model, enc, ids, u.defaults.max_new_tokens)
    with st.on(u.model):
        now = greedy(u.model, enc, ids, u.defaults.max_new_tokens)

    def labels(name: str) -> list[str]:  # each row of the projection's A: its request and fact
        return [f"{e['id']} {e['records'][j]['prompt'] if j < len(e['records']) else ''}"
                for e, _ in st._starts(name) for j in range(e["rank"])]

    layout = lora.settings_from_peft(st.adapter_files()[1], u.model.config.num_hidden_layers, a.state)
    rows = []
    for p, x_ids, b, n in zip(prompts, ids, base, now):
        target = owner[p][0]
        if not answers_with(enc.decode(b), target):
            continue
        got = {}
        with torch.no_grad(), lora.reading_inputs(u.model, layout, lambda name, x: got.__setitem__(name, x.float())) as end:
            u.model.run_layers(u.model.embed(torch.tensor([x_ids])), torch.arange(len(x_ids))[None], AttnMask(), end=end)
        reads = {}
        for name, x in got.items():
            for label, v in zip(labels(name), (x @ st.A[name].float().t()).abs().max(0).values.tolist()):
                reads[label] = max(v, reads.get(label, 0.0))
        top = sorted(reads.items(), key=lambda kv: -kv[1])[:3]
        lost = not answers_with(enc.decode(n), target)
        part = next((j for j in range(min(len(b), len(n))) if b[j] != n[j]), min(len(b), len(n)))
        rows.append({"prompt": p, "lost": lost, "parts_at": part if lost else None, "now": enc.decode(n) if lost else None,
                     "read_by": [(round(v, 3), label) for label, v in top]})
    for r in sorted(rows, key=lambda r: (not r["lost"], -r["read_by"][0][0])):
        print("LOST" if r["lost"] else "kept", f"{r['prompt'][:48]:48s}", r["read_by"])
    for lost in (True, False):
        top = [r["read_by"][0][0] for r in rows if r["lost"] == lost]
        if top:
            print(f"{'lost' if lost else 'kept'}: {len(top)}, median largest read {statistics.median(top):.3f}")
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
