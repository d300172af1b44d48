"""A stream of deletion requests into one lifelong state (lune_fast.state), measured as it grows.

    lune-fast bench stream --per-request 1 --requests 100 --eval-every 10 --out stream_1

Requests of --per-request facts from the validation set (facts nobody tuned on) go one after another into one
state. With --mode replace the requests replace the answers (--facts a,b: several record files, taken in turn,
e.g. CounterFact and TOFU: the model need not know a record for its replacement to be measured), and the checks
are CounterFact's own scores (ROME, MEMIT and AlphaEdit report them), teacher-forced, so that thousands of
records are scored in a minute: efficacy = the share of prompts whose new answer has a higher mean token
log-probability than the old one, paraphrase = the same on the paraphrases, neighbourhood = the share of
neighbour prompts whose own answer still beats the record's new one (also relative to the base model's);
"returned" is then a fact whose new answer won at an earlier check and does not now. Every --eval-every requests (and after the last), over all facts forgotten so far, on the model with
the whole state: forget, paraphrase (naming the subject) and indirect-paraphrase recall, neighbours kept (over
those the base model answered, relative to before), retain perplexity relative to before, and how many facts
that were gone at an earlier check answer again ("returned"). Each request's wall time (the whole
forget() call, no evaluation) gives the latency figures. Rows go to OUT.jsonl as they finish, the summary to
OUT.json, the curves to OUT.png (with matplotlib); results already there are kept unless --overwrite. --state DIR
keeps the state; a state already in DIR is resumed (a long stream stopped part-way goes on; a stream with its last
requests revoked is run again from there).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import machine, markdown_table, write_json

GOALS = "forget <= 0.05, paraphrase <= 0.20, neighbours >= 0.90x, retain ppl <= 1.10x, no fact returns"
GOALS_REPLACE = ("efficacy >= 0.95, neighbourhood comparisons the base model won still won >= 0.95, retain ppl <= "
                 "1.10x, no fact returns")


def _base_answers(u, facts, texts) -> tuple[dict, float]:
    """The base model's hit on every probe of the stream's facts, by (prompt, target), and its retain ppl."""
    ev = u.base_evaluation(facts, texts, False, u.defaults.max_new_tokens, progress=True)
    # keyed by text, not position: a neighbour that is a later request's forget prompt is a neighbour until
    # that request, and its base answer is the forget probe's
    return {(p.prompt, p.target): h for p, h in zip(ev.probes, ev.hits)}, ev.retain_ppl


def measure(u, st, facts, texts, base_hits: dict, base_ppl: float) -> tuple[dict, list[bool]]:
    """The state's METRICS over `facts` (rates over the probes the base model answered) and each fact's
    forget hit."""
    from ..evaluate import evaluate

    with st.on(u.model):
        ev = evaluate(u.model, u.encoder, facts, texts, False, u.defaults.max_new_tokens)
    known = [p.kind == "forget" or base_hits.get((p.prompt, p.target), False) for p in ev.probes]
    m = ev.metrics(known)
    forget_hits = [h for p, h in zip(ev.probes, ev.hits) if p.kind == "forget"]
    return {"forget": m["forget_recall"], "para": m["paraphrase_recall"], "indirect": m["indirect_recall"],
            "neigh_rel": m["neighbor_recall"], "ppl_rel": ev.retain_ppl / base_ppl}, forget_hits


def preference_scores(u, facts, texts) -> tuple[dict, dict]:
    """CounterFact's scores on the model as it is: efficacy, paraphrase and neighbourhood (each a share of
    pairwise comparisons of mean token log-probabilities, teacher-forced) and retain perplexity (None without
    texts); and each comparison's outcome, by kind, keyed by (prompt, the answer that should win, the other)."""
    from ..data import make_batch
    from ..evaluate import answer_logprobs, perplexity

    enc = u.encoder
    comparisons = {"efficacy": [], "paraphrase": [], "neighbourhood": []}  # (prompt, answer that should win, other)
    for f in facts:
        comparisons["efficacy"].append((f.prompt, f.replacement, f.target, f.chat))
        comparisons["paraphrase"] += [(p, f.replacement, f.target, f.chat) for p in f.paraphrases]
        comparisons["neighbourhood"] += [(p, t, f.replacement, f.chat) for p, t in f.neighbors if t != f.replacement]
    wins, scores = {}, {}
    for kind, rows in comparisons.items():
        pairs = [enc.pair(p, a, chat) for p, win, lose, chat in rows for a in (win, lose)]
        lp = torch.cat([answer_logprobs(u.model, make_batch(pairs[i:i + 256], enc.pad_id))
                        for i in range(0, len(pairs), 256)]) if pairs else torch.zeros(0)
        won = (lp[0::2] > lp[1::2]).tolist()
        wins[kind] = {row[:3]: w for row, w in zip(rows, won)}
        scores[kind] = sum(won) / len(won) if won else None
    return {**scores, "ppl": perplexity(u.model, enc, texts) if texts else None}, wins


def measure_replace(u, st, facts, texts, base: tuple[dict, dict]) -> tuple[dict, list[bool]]:
    """preference_scores with the whole state on the model, the neighbourhood comparisons the base model won
    that still hold ("neigh_rel"), and per fact whether its new answer wins on its prompt."""
    with st.on(u.model):
        m, wins = preference_scores(u, facts, texts)
    base_scores, base_wins = base
    held = [w for key, w in wins["neighbourhood"].items() if base_wins["neighbourhood"].get(key)]
    return {"efficacy": m["efficacy"], "paraphrase": m["paraphrase"], "neighbourhood": m["neighbourhood"],
            "neigh_rel": sum(held) / len(held) if held else None, "ppl_rel": m["ppl"] / base_scores["ppl"]}, \
        list(wins["efficacy"].values())


def meets(row: dict, replace: bool = False) -> bool:
    kept = row["neigh_rel"] is None or row["neigh_rel"] >= (0.95 if replace else 0.90)
    done = row["efficacy"] >= 0.95 if replace else \
        row["forget"] <= 0.05 and (row["para"] is None or row["para"] <= 0.20)
    return done and kept and row["ppl_rel"] <= 1.10 and row["returned"] == 0


def held_records(folder: Path, records: list[dict]) -> tuple[list, int, int]:
    """The facts a stream's existing state folder holds, how many requests made them, and how many of `records`
    they take up. They must be among the records in their order: records between them were skipped by a
    request (unusable, or unknown to the model) or went with a revoked request, and are not asked again; the
    stream resumes after the last held one. Nothing held: ([], 0, 0)."""
    from ..data import RecordError, parse_record
    from ..state import LEDGER, State, StateError

    if not (folder / LEDGER).exists():
        return [], 0, 0
    st = State.open(folder)
    held = st.earlier_facts()

    def said(record: dict) -> tuple | None:
        try:
            f = parse_record(record, "")
        except RecordError:
            return None
        return f.prompt, f.target

    said_by = [said(r) for r in records]
    pos = 0
    for k, f in enumerate(held):
        at = next((j for j in range(pos, len(records)) if said_by[j] == (f.prompt, f.target)), None)
        if at is None:
            there = f"record {pos + 1} is {said_by[pos][0]!r} -> {said_by[pos][1]!r}" \
                if pos < len(records) and said_by[pos] else f"the stream has {len(records)} records"
            raise StateError(f"{folder}: its fact {k + 1}, {f.prompt!r} -> {f.target!r}, is not among the stream's "
                             f"records from record {pos + 1} on ({there}); a stream resumes only a state built "
                             f"from the same records, in their order")
        pos = at + 1
    return held, sum(1 for e in st.active() if not e.get("repair")), pos


def run(u, records: list[dict], per_request: int, requests: int, eval_every: int, folder: Path,
        out_jsonl: Path | None = None, overrides: dict | None = None, mode: str = "suppress",
        held: tuple[list, int, int] | None = None) -> tuple[list[dict], list[float]]:
    """`requests` more requests of `per_request` records into the state at `folder`. A state already there
    (a stream stopped part-way, or some requests revoked) is resumed: its facts must be among the records in their
    order (held_records); it is measured first (the row of its last request, without a time), and the stream goes
    on after the last of them. held: held_records(folder, records) when the caller has it already."""
    from tqdm.auto import tqdm

    from ..data import read_facts
    from ..state import State

    done, held_requests, used = held if held is not None else held_records(folder, records)
    records = records[used:]
    chunks = [records[i * per_request:(i + 1) * per_request] for i in range(requests)]
    chunks = [c for c in chunks if c]
    texts = u.retain_texts()
    all_facts = done + read_facts([r for c in chunks for r in c]).facts
    replace = mode == "replace"
    if replace:
        base = preference_scores(u, all_facts, texts)
        tqdm.write("base model: " + json.dumps(base[0]))
    else:
        base_hits, base_ppl = _base_answers(u, all_facts, texts)
    rows, seconds, gone_once = [], [], set()

    def check(n_requests: int, r=None) -> None:
        st = State.open(folder)
        if replace:  # gone: the new answer wins
            m, gone = measure_replace(u, st, done, texts, base)
        else:  # gone: the target is not said
            m, hits = measure(u, st, done, texts, base_hits, base_ppl)
            gone = [not h for h in hits]
        returned = [f.prompt for f, g in zip(done, gone) if not g and f.prompt in gone_once]
        gone_once.update(f.prompt for f, g in zip(done, gone) if g)
        row = {"requests": n_requests, "facts": len(done), **m, "returned": len(returned), "rank": st.rank,
               "repairs": sum(len(e["records"]) for e in st.repairs()),
               "windows": len({tuple(e["settings"]["layers"]) for e in st.active()}),
               "request_s": round(seconds[-1], 3) if r is not None else None,
               "steps": r.cost["steps"] if r is not None else None, "stopped": r.stopped if r is not None else None,
               "returned_prompts": returned}  # which facts came back, to look into
        row["meets"] = meets(row, replace)
        rows.append(row)
        tqdm.write(json.dumps(row))
        if out_jsonl is not None:
            with open(out_jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    if done:
        passed = f"; {used - len(done)} records before them were skipped or revoked" if used > len(done) else ""
        tqdm.write(f"{folder}: resuming after {held_requests} requests ({len(done)} facts{passed})")
        check(held_requests)
    for i, chunk in enumerate(tqdm(chunks, desc="requests", unit="request")):
        t0 = time.perf_counter()
        r = u.forget(chunk, mode=mode, into=folder, progress=False, evaluate_before=False, evaluate_after=False,
                     **(overrides or {}))
        seconds.append(time.perf_counter() - t0)
        done = done + r.facts
        if (i + 1) % eval_every == 0 or i + 1 == len(chunks):
            check(held_requests + i + 1, r)
    return rows, seconds


def latency(seconds: list[float]) -> dict:
    s = sorted(seconds)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    head = statistics.median(seconds[:5])
    tail = statistics.median(seconds[-5:])
    return {"p50_s": round(pick(0.5), 3), "p95_s": round(pick(0.95), 3), "max_s": round(s[-1], 3),
            "first5_median_s": round(head, 3), "last5_median_s": round(tail, 3),
            "last_over_first": round(tail / head, 3), "total_s": round(sum(seconds), 1)}


def plot(rows: list[dict], seconds: list[float], per_request: int, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    x = [r["facts"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    replace = "efficacy" in rows[0]
    curves = (("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("neighbourhood", "neighbourhood")) \
        if replace else (("forget", "forget"), ("para", "paraphrase"), ("indirect", "indirect paraphrase"))
    for key, label in curves:
        axes[0].plot(x, [r[key] for r in rows], marker="o", ms=3, label=label)
    for level in (0.95,) if replace else (0.05, 0.20):
        axes[0].axhline(level, ls=":", color="gray")
    axes[0].set_ylabel("score (CounterFact's)" if replace else "recall (lower is better)")
    axes[1].plot(x, [r["neigh_rel"] for r in rows], marker="o", ms=3, color="tab:green", label="neighbours kept")
    axes[1].plot(x, [1 / r["ppl_rel"] for r in rows], marker="o", ms=3, color="tab:purple", label="1 / retain ppl ×")
    axes[1].axhline(0.95 if replace else 0.90, ls=":", color="gray")
    axes[1].set_ylim(min([0.5] + [1 / r["ppl_rel"] - 0.03 for r in rows]), 1.05)
    start = x[0] if rows[0].get("request_s", 0) is None else 0  # a resumed stream's first row: the state it found
    axes[2].plot([min(start + per_request * (i + 1), x[-1]) for i in range(len(seconds))], seconds, marker=".",
                 ms=3, lw=0.8,
                 color="tab:red", label="each request's seconds")
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("facts forgotten")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def interleave(lists: list[list[dict]]) -> list[dict]:
    """One record from each list in turn, until all are used."""
    return [r for i in range(max(map(len, lists))) for lst in lists if i < len(lst) for r in [lst[i]]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", help="records (default: the package's validation set, never tuned on); several "
                                    "files separated by commas are taken in turn, one record from each")
    ap.add_argument("--mode", choices=("suppress", "replace"), default="suppress")
    ap.add_argument("--per-request", type=int, default=1, help="facts per request")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10, help="measure the whole state every N requests")
    ap.add_argument("--settings", default="{}", help="JSON overrides for every request")
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", help="write OUT.jsonl (rows), OUT.json (summary) and OUT.png (curves)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT.* (a resumed stream's rows "
                                                             "belong in a new OUT: those of the first run stay)")
    ap.add_argument("--state", help="the stream's state folder, kept (default: a temporary one); a state already "
                                    "there is resumed: its facts must be among the records in their order (a "
                                    "stream stopped part-way, or with requests revoked), and --requests more "
                                    "follow after the last of them")
    a = ap.parse_args(argv)

    from ..api import Unlearner
    from ..assets import asset
    from ..data import _json_lines
    from ..state import StateError

    sources = [Path(f) for f in a.facts.split(",")] if a.facts else [asset("validation.jsonl")]
    records = interleave([[obj for _, obj in _json_lines(f)] for f in sources])
    source = ", ".join(f.name for f in sources)
    need = a.per_request * a.requests
    if need > len(records):
        print(f"{source} has {len(records)} records: {a.requests} requests of {a.per_request} take "
              f"{len(records) // a.per_request}")
    out = Path(a.out) if a.out else None
    # refused before the model loads: earlier results in the way, a state built from other records
    there = [p for p in (f"{out}.jsonl", f"{out}.json", f"{out}.png") if Path(p).exists()] if out else []
    if there and not a.overwrite:
        print(f"lune-fast: {', '.join(there)} already exist(s); pass --overwrite to replace, or another --out",
              file=sys.stderr)
        return 2
    held = None
    if a.state:
        try:
            held = held_records(Path(a.state), records)
        except StateError as e:
            print(f"lune-fast: {e}", file=sys.stderr)
            return 2
    u = Unlearner(a.model, dtype=a.dtype)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.jsonl").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows, seconds = run(u, records, a.per_request, a.requests, a.eval_every,
                            Path(a.state) if a.state else Path(tmp) / "state",
                            Path(f"{out}.jsonl") if out else None, json.loads(a.settings), a.mode, held)
    lat = latency(seconds) if seconds else {}
    replace = a.mode == "replace"
    scores = ["efficacy", "paraphrase", "neighbourhood"] if replace else ["forget", "para", "indirect"]
    print(markdown_table(rows, ["requests", "facts"] + scores + ["neigh_rel", "ppl_rel", "returned", "rank",
                                                                 "windows", "request_s", "meets"]))
    goals = GOALS_REPLACE if replace else GOALS
    print(f"goals: {goals}; met at {sum(r['meets'] for r in rows)}/{len(rows)} checks")
    print("latency per request:", json.dumps(lat))
    if out is not None:
        write_json(f"{out}.json", {"machine": machine(), "source": source, "mode": a.mode,
                                   "per_request": a.per_request, "requests": len(seconds),
                                   "settings": json.loads(a.settings), "goals": goals,
                                   "latency": lat, "request_seconds": [round(s, 3) for s in seconds], "rows": rows})
        plot(rows, seconds, a.per_request, Path(f"{out}.png"),
             f"{len(seconds)} requests of {a.per_request} fact(s), {a.mode}, {source}")
    return 0
