"""Quality frontier: forget vs paraphrase vs neighbour recall, retain perplexity and train time, over settings.

    lune-fast bench quality [--facts FILE] [--n 32] [--grid NAME | --settings JSON ...] [--mode suppress]
                            [--relearn] [--json OUT] [--md OUT] [--plot OUT.png]

One model load; the base model's evaluation is computed once and reused; each setting trains a fresh adapter.
Grids are named lists of overrides of lune_fast.settings.Settings (see GRIDS) or given inline as JSON objects.
--relearn adds the relearning attack to each setting (see `relearn_probe`).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

from .harness import machine, markdown_table, write_json

GRIDS: dict[str, list[dict]] = {
    # objective x learning rate, the rest at the calibration's setting
    "objective": [
        {"objective": "npo", "lr": 3e-4}, {"objective": "npo", "lr": 1e-3}, {"objective": "npo", "lr": 3e-3},
        {"objective": "ga", "lr": 1e-4}, {"objective": "ga", "lr": 3e-4},
        {"objective": "ul", "lr": 1e-3}, {"objective": "ul", "lr": 3e-3},
        {"objective": "simnpo", "lr": 1e-3}, {"objective": "simnpo", "lr": 3e-3},
    ],
    # where the adapter sits and how big it is
    "placement": [
        {"targets": "gate,up,down", "layers": "8-20"}, {"targets": "all", "layers": "8-20"},
        {"targets": "down", "layers": "8-20"}, {"targets": "q,v", "layers": "8-20"},
        {"targets": "gate,up,down", "layers": "10-14"}, {"targets": "gate,up,down", "layers": "12"},
        {"targets": "gate,up,down", "layers": "0-29"}, {"targets": "gate,up,down", "layers": "20-26"},
        {"targets": "gate,up,down", "layers": "8-20", "rank": 4},
        {"targets": "gate,up,down", "layers": "8-20", "rank": 16},
    ],
    # how the negatives are built and when an example stops
    "negatives": [
        {"negatives": "gold"}, {"negatives": "self"}, {"negatives": "both"},
        {"per_example_stop": True}, {"per_example_stop": True, "negatives": "self"},
        {"stop_prob": 0.1}, {"stop_prob": 0.02},
    ],
    "replace": [
        {"mode": "replace", "lr": 3e-4}, {"mode": "replace", "lr": 1e-3}, {"mode": "replace", "lr": 3e-3},
        {"mode": "replace", "lr": 1e-3, "per_example_stop": True},
        {"mode": "replace", "lr": 1e-3, "targets": "all"},
        {"mode": "replace", "lr": 1e-3, "layers": "10-14"},
    ],
}


def load_records(path: str | None, n: int | None, known_ids: str | None = None) -> list[dict]:
    from ..assets import asset
    from ..data import _json_lines

    src = Path(path) if path else asset("facts.jsonl")
    items = [obj for _, obj in _json_lines(src)]
    if known_ids:
        keep = set(json.loads(Path(known_ids).read_text()))
        items = [r for r in items if r.get("case_id") in keep]
    return items[:n]


def known_records(u, records: list[dict]) -> list[dict]:
    """The records whose main prompt the frozen model answers with the target (greedy, first line)."""
    from ..data import read_facts
    from ..evaluate import answers_with, build_probes, greedy_answers

    facts = read_facts(records).facts
    if len(facts) != len(records):
        raise ValueError("--known-only needs every record to be readable")
    probes = [p for p in build_probes(facts) if p.kind == "forget"]
    gens = greedy_answers(u.model, u.encoder, probes)
    return [r for r, p, g in zip(records, probes, gens) if answers_with(g, p.target)]


@contextmanager
def adapter_on(model, result):
    """`result`'s adapter on `model` inside the block, taken off afterwards."""
    from .. import lora

    result.attach_to(model)
    try:
        yield model
    finally:
        lora.detach(model)


class Bystanders:
    """Facts of the records file outside the request: how many of those the base model answers still come out
    with the adapter on (their main prompts). The locality measure that no setting can have read: the records'
    listed neighbours may be used by the method (--preserve-neighbors), these never are."""

    def __init__(self, unlearner, records: list[dict]):
        import copy

        from ..data import read_facts
        from ..evaluate import Probe

        self.enc = unlearner.encoder
        self.probes = [Probe("forget", f.prompt, f.target, f.chat) for f in read_facts(records).facts]
        self.model = copy.deepcopy(unlearner.model)  # the adapters go on this copy, never on the unlearner's
        self.known = self._hits()

    def _hits(self) -> list[bool]:
        from ..evaluate import answers_with, greedy_answers

        return [answers_with(g, p.target) for g, p in zip(greedy_answers(self.model, self.enc, self.probes),
                                                          self.probes)]

    def kept(self, result) -> tuple[int, int]:
        with adapter_on(self.model, result):
            after = self._hits()
        return sum(a for a, k in zip(after, self.known) if k), sum(self.known)


DTYPES = ("float32", "float16", "bfloat16")


class PreferenceScores:
    """CounterFact's own scores with the adapter on (lune_fast.bench.stream.preference_scores: efficacy,
    paraphrase efficacy, each a share of teacher-forced comparisons of the two answers), and locality by that
    probability rule: the share of the neighbourhood comparisons the base model won (true answer over the
    replacement) that still hold. The row's `neigh_rel` is locality by the greedy recall rule."""

    def __init__(self, unlearner, records: list[dict]):
        from ..data import read_facts
        from .stream import preference_scores

        self.u = unlearner
        _, wins = preference_scores(unlearner, read_facts(records).facts, [])
        self.base_won = wins["neighbourhood"]

    def row(self, result) -> dict:
        from .stream import preference_scores

        with adapter_on(self.u.model, result):
            m, wins = preference_scores(self.u, result.facts, [])
        held = [w for key, w in wins["neighbourhood"].items() if self.base_won.get(key)]
        return {"cf_efficacy": m["efficacy"], "cf_para": m["paraphrase"],
                "cf_locality": sum(held) / len(held) if held else None}


def batches_of(records: list[dict], size: int, seed: int) -> list[list[dict]]:
    """The records in a random order (seeded) cut into consecutive batches of `size`; a last, smaller one is
    left out, so that every batch asks as much of the method."""
    order = list(records)
    random.Random(seed).shuffle(order)
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


class PrecisionProbe:
    """Recall with the adapter read at other precisions than it was trained at. A GGUF type (q8_0, q4_1, ...):
    the adapter folded into the weights and every weight rounded as `lune-fast export --quant` writes it
    (lune_fast.export.quantized), on the unlearner's model. A dtype (float32, as transformers + PEFT load the
    model by default; float16, as most GPU serving does; bfloat16): the model loaded afresh from its folder in
    that dtype, the adapter attached as PEFT's files hold it. Paraphrases and neighbours count over what the base
    model answers at that same precision (the goal compares with the base model as it is served)."""

    def __init__(self, unlearner, records: list[dict], precisions: list[str], replace: bool):
        import torch

        from ..data import read_facts
        from ..weights import load_model

        self.u, self.precisions, self.replace = unlearner, precisions, replace
        self.facts = read_facts(records).facts
        self.twins = {p: load_model(unlearner.model_dir, dtype=getattr(torch, p)) for p in precisions if p in DTYPES}
        self._base: dict = {}  # (precision, fact indices) -> the base model's Evaluation

    def _evaluate(self, precision: str, facts):
        from ..evaluate import evaluate
        from ..export import quantized

        model = self.twins.get(precision, self.u.model)
        with quantized(model, None if precision in self.twins else precision):
            return evaluate(model, self.u.encoder, facts, None, self.replace)

    def counts(self, result, which: tuple[int, ...] | None = None) -> dict[str, dict[str, list[int]]]:
        """precision -> kind -> [hits, counted] for the facts `which` (default: all) with `result`'s adapter:
        forget and replacement over every forget prompt, paraphrases and neighbours over the base's answers."""
        which = tuple(range(len(self.facts))) if which is None else tuple(which)
        facts = [self.facts[i] for i in which]
        out = {}
        for p in self.precisions:
            if (p, which) not in self._base:  # before the adapter goes on: forget() leaves the model as it was
                self._base[p, which] = self._evaluate(p, facts)
            base = self._base[p, which]
            with adapter_on(self.twins.get(p, self.u.model), result):
                after = self._evaluate(p, facts)
            c = out[p] = {k: [0, 0] for k in ("forget", "para", "neigh", "replace", "base_forget")}

            def count(kind, value):
                c[kind][0] += value
                c[kind][1] += 1

            for probe, hit, was, rep in zip(after.probes, after.hits, base.hits, after.replaced):
                if probe.kind == "forget":
                    count("forget", hit)
                    count("base_forget", was)
                    if rep is not None:
                        count("replace", rep)
                elif probe.kind in ("paraphrase", "neighbor") and was:
                    count("para" if probe.kind == "paraphrase" else "neigh", hit)
        return out

    def logprob_shift(self, result, which: tuple[int, ...] | None = None) -> dict[str, float]:
        """precision -> the largest rise, over the facts, of the target's mean token log-prob (teacher-forced)
        from the dtype the adapter was trained in to this dtype: the margin a stop criterion read in the
        training dtype needs to hold in this one."""
        import torch

        from ..data import make_batch
        from ..evaluate import answer_logprobs

        enc = self.u.encoder
        facts = [self.facts[i] for i in (range(len(self.facts)) if which is None else which)]
        batch = make_batch([enc.pair(f.prompt, f.target, f.chat) for f in facts], enc.pad_id)
        lp = {}
        with torch.no_grad():
            for p, model in [("trained", self.u.model), *self.twins.items()]:
                with adapter_on(model, result):
                    lp[p] = answer_logprobs(model, batch).float()
        return {p: float((lp[p] - lp["trained"]).max()) for p in self.twins}

    def columns(self) -> list[str]:
        return [f"{k}@{p}" for p in self.precisions for k in ("forget", "para", "neigh", "replace", "dlogp")]

    @staticmethod
    def rates(counts: dict[str, dict[str, list[int]]]) -> dict:
        return {f"{k}@{p}": (n / d if d else None) for p, c in counts.items() for k, (n, d) in c.items()}

    def row(self, result, which: tuple[int, ...] | None = None) -> dict:
        return {**self.rates(self.counts(result, which)),
                **{f"dlogp@{p}": v for p, v in self.logprob_shift(result, which).items()}}


def run(unlearner, records: list[dict], grid: list[dict], base: dict, progress: bool = True,
        on_row=None, relearn: bool = False, bystanders: Bystanders | None = None,
        precision: PrecisionProbe | None = None, preference: PreferenceScores | None = None,
        which: tuple[int, ...] | None = None) -> list[dict]:
    """A row per setting of the grid, each a fresh adapter on `records` at once. `which`: the records'
    places in the list the precision probe was built on (default: all of it)."""
    from tqdm.auto import tqdm

    rows = []
    for overrides in tqdm(grid, desc="settings", unit="run", disable=not progress):
        settings = {**base, **overrides}
        t0 = time.perf_counter()
        r = unlearner.forget(records, progress=False, **settings)
        row = {"setting": json.dumps(overrides, sort_keys=True), **_flat(r, records),
               "wall_s": time.perf_counter() - t0}
        if bystanders is not None:
            row["bystand"] = _rate(bystanders.kept(r))
        if precision is not None:
            row.update(precision.row(r, which))
        if relearn:
            row.update(relearn_probe(unlearner, records, r))
        if preference is not None:
            row.update(preference.row(r))
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def relearn_probe(unlearner, records: list[dict], result, fraction: float = 0.1, steps: int = 20,
                  lr: float = 1e-3, seed: int = 0) -> dict:
    """The relearning attack: fold the unlearning adapter into a copy of the model, fine-tune a fresh LoRA
    (r 8 on all seven projections of every layer: an attacker with more reach than the unlearner) for `steps`
    steps on the true answers of `fraction` of the forgotten records, then measure the recall of the others.
    Recall that comes back on facts the attacker never showed means the knowledge was hidden, not removed."""
    import copy

    from .. import lora
    from ..data import make_batch, read_facts
    from ..evaluate import evaluate
    from ..plan import PACK_TOKENS
    from ..trainer import RunOptions, TrainData, TrainSettings, train

    facts = read_facts(records).facts
    k = max(1, round(fraction * len(facts)))
    shown = set(random.Random(seed).sample(range(len(facts)), k))
    attack = [f for i, f in enumerate(facts) if i in shown]
    held = [f for i, f in enumerate(facts) if i not in shown]
    model = copy.deepcopy(unlearner.model)
    result.attach_to(model)
    lora.merge_and_unload(model)
    recall_unlearned = evaluate(model, unlearner.encoder, held).metrics()["forget_recall"]
    enc = unlearner.encoder
    batch = make_batch([enc.pair(f.prompt, f.target, f.chat) for f in attack], enc.pad_id, pack=PACK_TOKENS)
    attacker = lora.LoraSettings(rank=8, alpha=16, targets=lora.parse_targets("all"),
                                 layers=tuple(range(model.config.num_hidden_layers)))
    settings = TrainSettings(objective="replace", replace=True, lr=lr, steps=steps, replace_prob=2.0, seed=seed)
    lora.attach(model, attacker, seed=seed)
    outcome = train(model, TrainData([batch]), settings, RunOptions(progress=False))
    after = evaluate(model, enc, held).metrics()
    shown_recall = evaluate(model, enc, attack).metrics()["forget_recall"]
    return {"relearn_shown": k, "relearn_steps": outcome.steps, "held_recall_unlearned": recall_unlearned,
            "held_recall_attacked": after["forget_recall"], "shown_recall_attacked": shown_recall}


def kept(r, kind: str, prompts: set[str] | None = None, exclude: set[str] = frozenset()) -> tuple[int, int]:
    """(answered after, answered before) over the probes of `kind` the base model answered (optionally only
    those whose prompt is in `prompts`, and none in `exclude`)."""
    eb, ea = r.evaluation_before, r.evaluation_after
    if eb is None or ea is None:
        return 0, 0
    pairs = [(h, k) for p, h, k in zip(ea.probes, ea.hits, eb.hits) if p.kind == kind and k and
             (prompts is None or p.prompt in prompts) and p.prompt not in exclude]
    return sum(h for h, _ in pairs), len(pairs)


def _rate(n_k: tuple[int, int]) -> float | None:
    return n_k[0] / n_k[1] if n_k[1] else None


def unseen_neighbor_recall(r) -> float | None:
    """Neighbour recall over the neighbours the base model answered whose prompt was not itself an anchor:
    what the method keeps without having trained on that exact prompt."""
    return _rate(kept(r, "neighbor", exclude=set(r.anchors)))


def _shares(records: list[dict]) -> dict[str, set[str]]:
    """Neighbour prompts by what they share with their fact ("relation", "subject"), where records say so."""
    out: dict[str, set[str]] = {}
    for rec in records:
        for n in rec.get("neighbors") or []:
            if isinstance(n, dict) and n.get("shares"):
                out.setdefault(n["shares"], set()).add(n["prompt"])
    return out


def _flat(r, records: list[dict] | None = None) -> dict:
    b, a = r.before, r.after
    rel = lambda k: (a[k] / b[k]) if (a.get(k) is not None and b.get(k)) else None  # noqa: E731
    row = {
        "forget": a["forget_recall"], "para": a["paraphrase_recall"], "indirect": a.get("indirect_recall"),
        "neigh": a["neighbor_recall"],
        "neigh_rel": rel("neighbor_recall"), "neigh_unseen": unseen_neighbor_recall(r), "anchors": len(r.anchors),
        "replace": a["replacement_rate"], "para_replace": a.get("paraphrase_replacement_rate"), "ppl_rel": rel("retain_ppl"),
        "steps": r.cost["steps"], "train_s": r.cost["train_seconds"], "stopped": r.stopped,
        "before_forget": b["forget_recall"], "before_para": b["paraphrase_recall"],
        "before_neigh": b["neighbor_recall"],
    }
    for kind, prompts in _shares(records or []).items():
        row[f"neigh_{kind}"] = _rate(kept(r, "neighbor", prompts))
    row["neigh_n"] = kept(r, "neighbor")[1]  # the neighbours the base model answered: what "neigh" counts over
    row["para_n"] = kept(r, "paraphrase")[1]
    return row


def run_per_request(unlearner, records: list[dict], overrides: dict, progress: bool = True,
                    bystanders: Bystanders | None = None, precision: PrecisionProbe | None = None,
                    which: tuple[int, ...] | None = None) -> dict:
    """One request per record, each from the frozen model: pooled recall over the requests (each request's
    paraphrases and neighbours that the base model answered), the fewest neighbours any one request kept,
    the mean retain perplexity ratio and train time per request. `which`: as run's."""
    from tqdm.auto import tqdm

    from ..data import DataError

    which = tuple(range(len(records))) if which is None else which
    totals = {k: [0, 0] for k in ("forget", "paraphrase", "indirect", "neighbor", "replace", "bystand")}
    worst, ppl, seconds, steps, pooled, shift, unknown = None, [], [], [], {}, {}, 0
    for i, rec in enumerate(tqdm(records, desc="one request per fact", unit="request", disable=not progress)):
        try:
            r = unlearner.forget([rec], progress=False, **overrides)
        except DataError:  # the model at this dtype does not answer it: nothing to forget, nothing to count
            unknown += 1
            continue
        if precision is not None:  # pooled over the requests, as the rest of the row
            for p, c in precision.counts(r, (which[i],)).items():
                for kind, (n, d) in c.items():
                    total = pooled.setdefault(p, {}).setdefault(kind, [0, 0])
                    total[0] += n
                    total[1] += d
            for p, v in precision.logprob_shift(r, (which[i],)).items():
                shift[p] = max(shift.get(p, v), v)
        for kind in ("forget", "paraphrase", "indirect", "neighbor"):
            n, k = kept(r, kind) if kind != "forget" else (round(r.after["forget_recall"]), 1)
            totals[kind][0] += n
            totals[kind][1] += k
        if r.after["replacement_rate"] is not None:
            totals["replace"][0] += r.after["replacement_rate"]
            totals["replace"][1] += 1
        n, k = kept(r, "neighbor")
        if k:
            worst = n / k if worst is None else min(worst, n / k)
        if bystanders is not None:
            n, k = bystanders.kept(r)
            totals["bystand"][0] += n
            totals["bystand"][1] += k
        ppl.append(r.after["retain_ppl"] / r.before["retain_ppl"])
        seconds.append(r.cost["train_seconds"])
        steps.append(r.cost["steps"])
    rate = {k: (v[0] / v[1] if v[1] else None) for k, v in totals.items()}
    return {"setting": json.dumps({**overrides, "per_request": True}, sort_keys=True), "forget": rate["forget"],
            "para": rate["paraphrase"], "indirect": rate["indirect"], "neigh": rate["neighbor"],
            "neigh_rel": rate["neighbor"], "neigh_min": worst, "replace": rate["replace"],
            "bystand": rate["bystand"], "ppl_rel": sum(ppl) / len(ppl), "ppl_rel_max": max(ppl),
            "steps": sum(steps) / len(steps),
            "train_s": sum(seconds) / len(seconds), "requests": len(records) - unknown, "unknown": unknown, "anchors": 0,
            "stopped": "",
            **(PrecisionProbe.rates(pooled) if precision is not None else {}),
            **{f"dlogp@{p}": v for p, v in shift.items()}}


def meets_goals(row: dict, mode: str = "suppress") -> bool:
    """The quality goals the defaults are chosen against (suppress: forget ≤ .05, para ≤ .2; replace: replacement ≥ .9;
    both: neighbours ≥ .9 × before, retain perplexity ≤ 1.1 × before)."""
    local = (row["neigh_rel"] is None or row["neigh_rel"] >= 0.9) and (row["ppl_rel"] is None or row["ppl_rel"] <= 1.1)
    if mode == "replace":
        return local and (row["replace"] or 0) >= 0.9
    return local and row["forget"] <= 0.05 and (row["para"] is None or row["para"] <= 0.2)


def plot(rows: list[dict], path: str, title: str, baseline: list[tuple[str, float, float]] | None = None,
         chosen: tuple[str, ...] = ()) -> bool:
    """forget vs neighbour recall, one point per setting; calibration points (baseline) as red crosses; the
    settings in `chosen` (the defaults) as green stars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        star = r["setting"] in chosen
        ax.scatter(r["forget"], r["neigh"] if r["neigh"] is not None else 0, color="tab:green" if star else "tab:blue",
                   marker="*" if star else "o", s=160 if star else 30, zorder=3 if star else 2)
        if star or len(rows) <= 12:  # beyond a dozen points the labels only hide each other
            ax.annotate(_short(r["setting"]), (r["forget"], r["neigh"] or 0), fontsize=7 if star else 6, alpha=0.8)
    for label, f, n in baseline or []:
        ax.scatter(f, n, color="tab:red", marker="x")
        ax.annotate(label, (f, n), fontsize=6, color="tab:red")
    ax.set_xlabel("forget recall (lower is better)")
    ax.set_ylabel("neighbour recall (higher is better)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.axvline(0.05, ls=":", color="gray")
    ax.axhline(0.9, ls=":", color="gray")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return True


def _short(setting: str) -> str:
    d = json.loads(setting)
    return ",".join(f"{k}={v}" for k, v in d.items()) or "default"


RELEARN_COLUMNS = ["relearn_shown", "held_recall_unlearned", "held_recall_attacked", "shown_recall_attacked"]
COLUMNS = ["setting", "forget", "para", "indirect", "neigh", "neigh_unseen", "replace", "ppl_rel", "anchors", "steps",
           "train_s", "stopped"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", help="records file (default: the package's facts)")
    ap.add_argument("--known-ids", help="JSON list of case_ids to keep (CounterFact's default-model-knows.json)")
    ap.add_argument("--n", type=int, default=32, help="forget this many records at once")
    ap.add_argument("--known-only", action="store_true",
                    help="keep only the records whose prompt the base model answers with the target")
    ap.add_argument("--grid", action="append", choices=sorted(GRIDS), help="named grid(s) of settings")
    ap.add_argument("--settings", action="append", default=[], help="a JSON object of overrides (repeatable)")
    ap.add_argument("--base", default="{}", help="JSON overrides applied to every setting")
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--per-request", action="store_true",
                    help="forget each record in a request of its own instead of all at once (pooled recall, the "
                         "worst request's neighbours kept, train seconds per request)")
    ap.add_argument("--bystanders", type=int, default=0,
                    help="also measure recall on this many of the file's other records (never in the request)")
    ap.add_argument("--relearn", action="store_true",
                    help="add the relearning attack: 20 steps on 10%% of the records, recall of the rest")
    ap.add_argument("--quantize", default="",
                    help="comma-separated GGUF types (e.g. q8_0,q4_1,q4_0): also measure recall after the "
                         "export's quantization round trip, against the base model at the same type")
    ap.add_argument("--eval-dtypes", default="",
                    help="comma-separated dtypes (float32,float16,bfloat16): also measure recall with the adapter "
                         "on the model loaded in each, against the base model in the same dtype")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="shuffle the N records (--seed) and forget each batch of this many at once, a row per "
                         "batch (a last, smaller batch is left out)")
    ap.add_argument("--seed", type=int, default=0, help="the order of --batch-size's batches")
    ap.add_argument("--counterfact", action="store_true",
                    help="add CounterFact's own scores: efficacy, paraphrase efficacy and locality by the "
                         "probability rule (cf_*), beside recall (replace mode)")
    ap.add_argument("--json", help="write rows here (JSON)")
    ap.add_argument("--jsonl", help="append each row here as it finishes")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--plot", help="PNG of forget vs neighbour recall")
    a = ap.parse_args(argv)
    if a.counterfact and a.per_request:
        ap.error("--counterfact scores requests made at once (--batch-size), not --per-request")
    from ..api import Unlearner

    grid = [g for name in (a.grid or []) for g in GRIDS[name]] + [json.loads(s) for s in a.settings]
    if not grid:
        grid = [{}]
    records = load_records(a.facts, None if a.known_only else a.n, a.known_ids)
    u = Unlearner(a.model, dtype=a.dtype)
    if a.known_only:
        records = known_records(u, records)[: a.n]
    base = json.loads(a.base)
    mode = base.get("mode", "suppress")

    def append(row):
        if a.jsonl:
            with open(a.jsonl, "a") as fh:
                fh.write(json.dumps({**row, "facts": a.facts, "n": len(records), "base": base}) + "\n")

    if not 0 <= a.batch_size <= len(records):
        ap.error(f"--batch-size: expected 1-{len(records)} (the records loaded), got {a.batch_size}")
    asked = {json.dumps(r, sort_keys=True) for r in records}
    others = [r for r in load_records(a.facts, None, a.known_ids) if json.dumps(r, sort_keys=True) not in asked]
    if a.bystanders and not others:
        print("no other records to use as bystanders: --bystanders ignored")
    by = Bystanders(u, others[:a.bystanders]) if a.bystanders and others else None
    dtypes = [d for d in a.eval_dtypes.split(",") if d]
    if any(d not in DTYPES for d in dtypes):
        ap.error(f"--eval-dtypes: expected some of {', '.join(DTYPES)}, got {a.eval_dtypes!r}")
    precisions = [q for q in a.quantize.split(",") if q] + dtypes
    probe = PrecisionProbe(u, records, precisions, mode == "replace") if precisions else None
    cf = PreferenceScores(u, records) if a.counterfact else None
    rows, place = [], {id(r): k for k, r in enumerate(records)}
    for i, batch in enumerate(batches_of(records, a.batch_size, a.seed) if a.batch_size else [records]):
        which = tuple(place[id(r)] for r in batch)  # where the probe finds the batch's records

        def on_row(row, i=i):
            if a.batch_size:
                row["batch"] = i
            append(row)
        if a.per_request:
            for overrides in grid:
                rows.append(run_per_request(u, batch, {**base, **overrides}, bystanders=by, precision=probe,
                                            which=which))
                on_row(rows[-1])
        else:
            rows += run(u, batch, grid, base, on_row=on_row, relearn=a.relearn, bystanders=by, precision=probe,
                        preference=cf, which=which)
    for r in rows:
        r["goals"] = "yes" if meets_goals(r, json.loads(r["setting"]).get("mode", mode)) else "no"
    extra = [c for c in ("batch", "neigh_relation", "neigh_subject", "neigh_min", "bystand", "para_replace",
                         "neigh_rel", "neigh_n", "cf_efficacy", "cf_para", "cf_locality")
             if any(r.get(c) is not None for r in rows)]
    extra += [c for c in (probe.columns() if probe else []) if rows[0].get(c) is not None]
    table = markdown_table(rows, COLUMNS[:6] + extra + COLUMNS[6:] + ["goals"] + (RELEARN_COLUMNS if a.relearn else []))
    print(f"{len(records)} records from {a.facts or 'the package facts'}, dtype {u.dtype}, base {base}")
    print(table)
    if a.md:
        Path(a.md).write_text(table + "\n")
    if a.json:
        write_json(a.json, {"machine": machine(), "facts": a.facts, "n": len(records), "base": base, "rows": rows})
    if a.plot:
        plot(rows, a.plot, f"{len(records)} facts, {Path(a.facts).name if a.facts else 'package facts'}")
    return 0
