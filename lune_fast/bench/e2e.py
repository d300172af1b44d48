"""End-to-end unlearning benchmark: lune_fast vs HF+PEFT vs full fine-tuning, same data and objective.

    lune-fast bench e2e [--facts FILE] [--n 32] [--dtype float32|bfloat16] [--objective npo] [--repeats 3]
                        [--json OUT] [--model default]

Each run is a fresh worker process (so each one's peak memory is its own), alternating the variants over
the repeats; figures are medians. What each variant does, on the same forget records:
- lune_fast: Unlearner defaults (adapter placement, packing, cached reference, answer-only fused head);
- HF+PEFT, written the way a user would: AutoModelForCausalLM + peft LoRA with the same targets, layers,
  rank and lr, labels = -100 on prompts, the NPO reference from disable_adapter() every step, torch AdamW,
  as many steps as lune_fast took;
- full fine-tuning: the same objective on every parameter (a frozen deep copy as the NPO reference), until
  the same stop criterion;
- lune_fast default (with --adapter plain, unless --no-default-row): Unlearner with no overrides at all, the
  keyed adapter and its objective, beside the like-for-like row (the time a user of the defaults waits).
time-to-unlearn = wall time from "model loaded" to "adapter saved". Time ratios are baseline ÷ lune_fast
(higher is better); memory ratios lune_fast ÷ baseline (lower is better). Quality METRICS of every run come
from the same evaluator (the PEFT adapter and the fine-tuned weights are loaded back into lune_fast's model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import PeakRSS, machine, markdown_table, write_json


def _records(path: str | None, n: int) -> list[dict]:
    from .quality import load_records

    return load_records(path, n)


# -- workers (one per process) -------------------------------------------------------------------------------
def worker_lune(args, defaults: bool = False) -> dict:
    from ..api import Unlearner

    records = _records(args.facts, args.n)
    u = Unlearner(args.model, dtype=args.dtype) if defaults else \
        Unlearner(args.model, dtype=args.dtype, objective=args.objective, adapter=args.adapter)
    loaded_rss = PeakRSS.current() / 2**20
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
        t0 = time.perf_counter()
        r = u.forget(records, evaluate_before=False, evaluate_after=False, progress=False)
        r.save(Path(tmp) / "out")
        wall = time.perf_counter() - t0
    out = {"variant": "lune_default" if defaults else "lune_fast", "time_to_unlearn": wall,
           "steps": r.cost["steps"],
           "step_seconds": statistics.median(r.outcome.step_seconds) if r.outcome.step_seconds else None,
           "peak_rss_mb": mem.peak_mb, "loaded_rss_mb": loaded_rss, "settings": r.config}
    if args.quality:
        out["metrics"] = _evaluate_lune(u, records, r)
    # a deletion request: one record in, adapter saved (model already loaded)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        one = u.forget(records[:1], evaluate_before=False, evaluate_after=False, progress=False)
        one.save(Path(tmp) / "one")
        out["forget_one_fact_seconds"] = time.perf_counter() - t0
    return out


def _evaluate_lune(u, records, result) -> dict:
    from .. import lora

    try:
        return _evaluate_with(u, records, result.attach_to)
    finally:
        lora.detach(u.model)  # the same model goes on to the one-fact request


def _hf_batch(tok, records, device):
    """Right-padded prompt+answer ids with labels -100 on the prompt, as a user writes it."""
    import torch

    from ..data import Encoder, read_facts

    enc = Encoder(tok)
    pairs = [enc.pair(f.prompt, f.target, f.chat) for f in read_facts(records).facts]
    T = max(len(p) + len(a) for p, a in pairs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(pairs), T), pad)
    labels = torch.full((len(pairs), T), -100)
    mask = torch.zeros(len(pairs), T, dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def _seq_logp(logits, labels):
    """Per-sequence summed log p(label) and mean token probability, from full logits (as HF users do)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    lab = labels[:, 1:]
    keep = lab != -100
    tok = logp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    mean_prob = (tok.detach().exp() * keep).sum(-1) / keep.sum(-1)
    return tok.sum(-1), mean_prob


def _npo(seq, ref, beta=0.1):
    import torch.nn.functional as F

    return (F.softplus(beta * (seq - ref)) * (2 / beta)).mean()


def _load_hf(args):
    """What both transformers baselines start from: settings, records, tokenizer, model, RSS once loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..settings import Settings, resolve_dtype
    from ..weights import resolve_model_dir

    folder = resolve_model_dir(args.model)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return Settings(adapter="plain").resolved(), _records(args.facts, args.n), tok, model, PeakRSS.current() / 2**20


def worker_peft(args) -> dict:
    s, records, tok, model, loaded_rss = _load_hf(args)
    step_times = []
    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            wall = _peft_run(args, model, tok, records, s, Path(tmp) / "peft", step_times) - t0
        metrics = _evaluate_adapter(args, Path(tmp) / "peft", records) if args.quality else None
    return {"variant": "hf_peft", "time_to_unlearn": wall, "steps": args.steps,
            "step_seconds": statistics.median(step_times) if step_times else None, "peak_rss_mb": mem.peak_mb,
            "loaded_rss_mb": loaded_rss, "metrics": metrics}


def _peft_run(args, model, tok, records, s, out: Path, step_times: list) -> float:
    """The HF+PEFT loop; returns the clock when the adapter is saved."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..lora import TARGETS, parse_layers, parse_targets

    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=[TARGETS[t][1] for t in parse_targets(s.targets)],
                     layers_to_transform=list(parse_layers(s.layers, model.config.num_hidden_layers)))
    pm = get_peft_model(model, cfg)
    ids, labels, mask = _hf_batch(tok, records, "cpu")
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr)
    for _ in range(args.steps):
        ts = time.perf_counter()
        with torch.no_grad(), pm.disable_adapter():
            ref, _ = _seq_logp(pm(input_ids=ids, attention_mask=mask).logits, labels)
        seq, _ = _seq_logp(pm(input_ids=ids, attention_mask=mask).logits, labels)
        _npo(seq, ref).backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter() - ts)
    pm.save_pretrained(str(out))
    return time.perf_counter()


def _evaluate_adapter(args, folder, records) -> dict:
    from .. import lora
    from ..api import Unlearner

    u = Unlearner(args.model, dtype=args.dtype)
    return _evaluate_with(u, records, lambda m: lora.load_adapter(m, folder))


def _evaluate_with(u, records, install) -> dict:
    from ..data import read_facts
    from ..evaluate import evaluate

    facts = read_facts(records).facts
    texts = u.retain_texts()
    before = u.base_evaluation(facts, texts, False, 24)
    install(u.model)
    return evaluate(u.model, u.encoder, facts, texts).metrics(before.known_mask())


def worker_fullft(args) -> dict:
    s, records, tok, model, loaded_rss = _load_hf(args)
    step_times = []
    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            wall = _full_ft_run(args, model, tok, records, s, Path(tmp) / "ft", step_times) - t0
        metrics = None
        if args.quality:
            from ..api import Unlearner
            from ..weights import load_model

            u = Unlearner(args.model, dtype=args.dtype)
            tuned = load_model(Path(tmp) / "ft", dtype=u.dtype)
            metrics = _evaluate_with(u, records, lambda m: m.load_state_dict(tuned.state_dict()))
    return {"variant": "full_ft", "time_to_unlearn": wall, "steps": len(step_times),
            "step_seconds": statistics.median(step_times) if step_times else None, "peak_rss_mb": mem.peak_mb,
            "loaded_rss_mb": loaded_rss, "metrics": metrics}


def _full_ft_run(args, model, tok, records, s, out: Path, step_times: list) -> float:
    """Full fine-tuning with a frozen deep copy as the NPO reference, until the same stop criterion (every
    answer's mean token probability below stop_prob, read off the step's own forward)."""
    import copy

    import torch

    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    ids, labels, mask = _hf_batch(tok, records, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=args.full_ft_lr)
    for _ in range(args.max_steps):
        ts = time.perf_counter()
        with torch.no_grad():
            ref, _ = _seq_logp(ref_model(input_ids=ids, attention_mask=mask).logits, labels)
        seq, mean_prob = _seq_logp(model(input_ids=ids, attention_mask=mask).logits, labels)
        if bool((mean_prob < s.stop_prob).all()):
            break
        _npo(seq, ref).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter() - ts)
    model.save_pretrained(str(out), safe_serialization=True)
    return time.perf_counter()


WORKERS = {"lune_fast": worker_lune, "hf_peft": worker_peft, "full_ft": worker_fullft,
           "lune_default": lambda args: worker_lune(args, defaults=True)}


# -- driver ---------------------------------------------------------------------------------------------------
def _spawn(variant: str, args, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, "-m", "lune_fast.bench.e2e", "--worker", variant, "--worker-out", out, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text())


def import_seconds(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import lune_fast"], check=True)
        times.append(time.perf_counter() - t0)
    empty = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        empty.append(time.perf_counter() - t0)
    return statistics.median(times) - statistics.median(empty)


def _median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", help="records file (default: the package's facts)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--objective", default="npo", help="lune_fast objective (baselines run NPO)")
    ap.add_argument("--adapter", default="plain", choices=["plain", "keyed"],
                    help="lune_fast's adapter; plain = the same LoRA as the PEFT baseline (a like-for-like speed "
                         "comparison), keyed = the quality default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full-ft", action="store_true")
    ap.add_argument("--full-ft-lr", type=float, default=1e-5)
    ap.add_argument("--max-steps", type=int, default=60, help="full fine-tuning step cap")
    ap.add_argument("--no-quality", dest="quality", action="store_false")
    ap.add_argument("--no-default-row", dest="default_row", action="store_false",
                    help="with --adapter plain, skip the row of lune_fast's own defaults (keyed)")
    ap.add_argument("--json")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        import torch

        torch.manual_seed(0)
        Path(a.worker_out).write_text(json.dumps(WORKERS[a.worker](a)))
        return 0

    common = ["--n", str(a.n), "--model", a.model, "--dtype", a.dtype, "--objective", a.objective,
              "--adapter", a.adapter, "--full-ft-lr", str(a.full_ft_lr), "--max-steps", str(a.max_steps)] + \
        (["--facts", a.facts] if a.facts else [])
    runs: dict[str, list[dict]] = {"lune_fast": [], "hf_peft": [], "full_ft": [], "lune_default": []}
    default_row = a.default_row and a.adapter == "plain"
    from tqdm.auto import tqdm

    bar = tqdm(total=a.repeats * (2 + (not a.no_full_ft) + default_row), desc="e2e runs", unit="run")
    for rep in range(a.repeats):
        q = ["--no-quality"] if (not a.quality or rep > 0) else []  # quality once per variant
        lune = _spawn("lune_fast", a, common + q)
        runs["lune_fast"].append(lune)
        bar.update(1)
        runs["hf_peft"].append(_spawn("hf_peft", a, common + q + ["--steps", str(lune["steps"])]))
        bar.update(1)
        if not a.no_full_ft:
            runs["full_ft"].append(_spawn("full_ft", a, common + q))
            bar.update(1)
        if default_row:
            runs["lune_default"].append(_spawn("lune_default", a, common + q))
            bar.update(1)
    bar.close()
    med = {v: {k: _median(rs, k) for k in ("time_to_unlearn", "step_seconds", "peak_rss_mb", "steps")}
           for v, rs in runs.items() if rs}
    ratio = lambda a_, b_: (a_ / b_) if (a_ and b_) else None  # noqa: E731
    L, P, F, D = med["lune_fast"], med["hf_peft"], med.get("full_ft", {}), med.get("lune_default", {})
    result = {
        "per_step_ratio": ratio(P["step_seconds"], L["step_seconds"]),
        "time_to_unlearn_ratio": ratio(P["time_to_unlearn"], L["time_to_unlearn"]),
        "peak_rss_ratio": ratio(L["peak_rss_mb"], P["peak_rss_mb"]),
        "full_ft_time_ratio": ratio(F.get("time_to_unlearn"), L["time_to_unlearn"]),
        "full_ft_peak_rss_ratio": ratio(L["peak_rss_mb"], F.get("peak_rss_mb")),
        # the defaults' (keyed) time to unlearn against HF+PEFT's like-for-like plain run
        "default_time_to_unlearn_ratio": ratio(P["time_to_unlearn"], D.get("time_to_unlearn")),
        "forget_one_fact_seconds": _median(runs["lune_fast"], "forget_one_fact_seconds"),
        "import_seconds": import_seconds(),
        "quality": {v: rs[0].get("metrics") for v, rs in runs.items() if rs},
        "medians": med, "settings": runs["lune_fast"][0]["settings"], "n_records": a.n, "facts": a.facts,
        "dtype": a.dtype, "repeats": a.repeats, "machine": machine(),
        "command": "lune-fast bench e2e " + " ".join(argv or sys.argv[1:]),
    }
    rows = [{"variant": v, **{k: (round(x, 3) if isinstance(x, float) else x) for k, x in m.items()}}
            for v, m in med.items()]
    print(markdown_table(rows))
    for k in ("per_step_ratio", "time_to_unlearn_ratio", "peak_rss_ratio", "full_ft_time_ratio",
              "full_ft_peak_rss_ratio", "default_time_to_unlearn_ratio", "forget_one_fact_seconds", "import_seconds"):
        v = result[k]
        print(f"{k:>30}: {v:.3f}" if isinstance(v, float) else f"{k:>30}: {v}")
    for v, m in result["quality"].items():
        if m:
            print(f"quality {v:>10}: " + ", ".join(f"{k}={x:.3f}" for k, x in m.items() if isinstance(x, float)))
    if a.json:
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
