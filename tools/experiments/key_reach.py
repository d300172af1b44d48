"""Do paraphrase leaks reach the keyed adapter? Forget the first N facts of a records file at once with the
defaults, then for every paraphrase the base model answered: how strongly it turns on its own fact's row of A
(A_i · x, summed over the adapted layers, the largest over the paraphrase's positions, on the frozen model),
as a share of what the fact's own forget prompt gives, beside whether it still gives the answer. A leak with a
share near 1 reaches the adapter and comes out anyway (another route to the answer); a small share never
reaches it (the paraphrase does not name the subject as the key reads it).

    python tools/experiments/key_reach.py FACTS N OUT.json
"""
import json
import statistics
import sys

import torch

from lune_fast import lora
from lune_fast.api import Unlearner
from lune_fast.data import make_batch


def reach(u, A: dict[str, torch.Tensor], prompt: str, row: int) -> tuple[float, str]:
    """The largest A_row · x over the prompt's positions (summed over the adapted layers), and that token."""
    ids = u.encoder.prompt_ids(prompt, False)
    got = {}
    hooks = [lora.frozen_linear(u.model, m).register_forward_pre_hook(
        lambda _m, a, m=m: got.__setitem__(m, a[0].reshape(-1, a[0].shape[-1]).float())) for m in A]
    try:
        with torch.no_grad(), lora.disabled(u.model):
            b = make_batch([(ids, [u.encoder.pad_id])], u.encoder.pad_id)
            positions, mask = b.layout()
            last = max(int(m.split(".")[1]) for m in A) + 1
            u.model.run_layers(u.model.embed(b.input_ids), positions, mask, end=last)
    finally:
        for h in hooks:
            h.remove()
    total = sum(got[m][:len(ids)] @ A[m][row] for m in A)
    k = int(total.argmax())
    return float(total[k]), u.encoder.decode([ids[k]])


def main() -> None:
    path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    records = [json.loads(line) for line in open(path) if line.strip()][:n]
    u = Unlearner()
    r = u.forget(records, progress=False)
    A = {lora.split_peft_key(k)[0]: v.float() for k, v in r.adapter.items() if "lora_A" in k}
    owner = {}
    for i, rec in enumerate(records):
        for p in [rec["prompt"], *rec.get("paraphrases", [])]:
            owner[p if isinstance(p, str) else p["prompt"]] = i
    row_of = {f.prompt: j for j, f in enumerate(r.facts)}
    rows = []
    for probe, was, hit in zip(r.evaluation_after.probes, r.evaluation_before.hits, r.evaluation_after.hits):
        j = row_of.get(records[owner[probe.prompt]]["prompt"]) if probe.prompt in owner else None
        if probe.kind in ("forget", "paraphrase") and was and j is not None:
            a, tok = reach(u, A, probe.prompt, j)
            rows.append({"kind": probe.kind, "fact": j, "prompt": probe.prompt, "leak": bool(hit), "reach": a,
                         "token": tok})
    own = {x["fact"]: x["reach"] for x in rows if x["kind"] == "forget"}
    for x in rows:
        x["share"] = x["reach"] / own[x["fact"]] if own.get(x["fact"]) else None
    for leak in (True, False):
        v = [x["share"] for x in rows if x["kind"] == "paraphrase" and x["leak"] == leak and x["share"] is not None]
        if v:
            print(f"{'leaked' if leak else 'kept'}: {len(v)} paraphrases, share median {statistics.median(v):.2f}, "
                  f"min {min(v):.2f}, under 0.6: {sum(s < 0.6 for s in v)}")
    json.dump({"facts": path, "n": n, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
