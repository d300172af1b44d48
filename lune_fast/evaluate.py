"""Before/after METRICS of an unlearning run (the report.json contract in docs/formats.md), and report.md.

recall = fraction of prompts whose greedy continuation *answers* with the target: the first non-empty
line contains it as a whole word or phrase (case-insensitive, whitespace collapsed, plural s/es allowed).
Plain substring matching would count "He" in "Helium" or "watt" in "kilowatt".
"""
from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field

import torch

from .distributed import Dist, shard, unshard
from .data import Batch, Encoder, Fact, listed_neighbors, make_batch
from .losses import per_sequence, target_logprobs
from .generate import generate
from .model import Transformer

METRIC_KEYS = ("forget_recall", "paraphrase_recall", "indirect_recall", "neighbor_recall", "replacement_rate",
               "paraphrase_replacement_rate", "forget_target_logprob", "retain_ppl")


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def answers_with(continuation: str, target: str) -> bool:
    """Does the first non-empty line of the continuation contain the target as a whole word/phrase?"""
    t = _norm(target)
    if not t:
        return False
    pattern = r"(?<!\w)" + re.escape(t) + r"(?:s|es)?(?!\w)"
    return re.search(pattern, _norm(first_line(continuation))) is not None


@dataclass
class Probe:
    """One prompt to answer: which fact it belongs to and what answer counts."""
    kind: str  # forget | paraphrase | indirect (a paraphrase that does not name the subject) | neighbor
    prompt: str
    target: str
    chat: bool = False
    replacement: str | None = None


def build_probes(facts: list[Fact]) -> list[Probe]:
    probes = [Probe("forget", f.prompt, f.target, f.chat, f.replacement) for f in facts]
    seen = set()
    for f in facts:
        for p in f.paraphrases:
            probes.append(Probe("paraphrase", p, f.target, f.chat, f.replacement))
    for f in facts:
        for p in f.indirect:
            probes.append(Probe("indirect", p, f.target, f.chat, f.replacement))
    for f, p, t in listed_neighbors(facts):
        if p not in seen:
            seen.add(p)
            probes.append(Probe("neighbor", p, t, f.chat))
    return probes


@dataclass
class Evaluation:
    probes: list[Probe]
    generations: list[str]
    hits: list[bool]
    replaced: list[bool | None]
    forget_target_logprob: float
    retain_ppl: float | None
    counts: dict = field(default_factory=dict)

    def metrics(self, known: list[bool] | None = None) -> dict:
        """METRICS; paraphrase/neighbor recall over the probes marked known (the base model's answers) when
        given, so that 'after' is measured on what there was to forget or keep."""
        def rate(kind, values):
            sel = [v for p, v, k in zip(self.probes, values, known or [True] * len(values))
                   if p.kind == kind and (k or kind == "forget") and v is not None]
            return (sum(sel) / len(sel)) if sel else None

        return {
            "forget_recall": rate("forget", self.hits),
            "paraphrase_recall": rate("paraphrase", self.hits),
            "indirect_recall": rate("indirect", self.hits),
            "neighbor_recall": rate("neighbor", self.hits),
            "replacement_rate": rate("forget", self.replaced),
            "paraphrase_replacement_rate": rate("paraphrase", self.replaced),
            "forget_target_logprob": self.forget_target_logprob,
            "retain_ppl": self.retain_ppl,
        }

    def known_mask(self) -> list[bool]:
        return list(self.hits)


@torch.no_grad()
def greedy(model: Transformer, enc: Encoder, prompts: list[list[int]], max_new_tokens: int = 24,
           batch_size: int = 64, return_logprobs: bool = False, progress=None):
    """Greedy answers (token ids) to token-id prompts, stopped at the end of the first non-empty line (all
    that recall reads), in batches of similar lengths; with return_logprobs also each token's log-prob."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    logps: list = [None] * len(prompts)
    stop = enc.line_stop(model.config.vocab_size, model.device)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        got = generate(model, [prompts[i] for i in idx], max_new_tokens, eos_token_id=eos_ids(enc, model),
                       pad_token_id=enc.pad_id, return_logprobs=return_logprobs, stop=stop)
        gens, lps = got if return_logprobs else (got, [None] * len(idx))  # no log-softmax a token when not asked
        for i, g, lp in zip(idx, gens, lps):
            out[i], logps[i] = g, lp
        if progress is not None:
            progress.update(len(idx))
    return (out, logps) if return_logprobs else out


def greedy_answers(model: Transformer, enc: Encoder, probes: list[Probe], max_new_tokens: int = 24,
                   progress=None) -> list[str]:
    ids = greedy(model, enc, [enc.prompt_ids(p.prompt, p.chat) for p in probes], max_new_tokens, progress=progress)
    return [enc.decode(g) for g in ids]


def eos_ids(enc: Encoder, model: Transformer) -> list[int]:
    ids = set(model.config.eos_token_id)
    if enc.tok.eos_token_id is not None:
        ids.add(enc.tok.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def answer_logprobs(model: Transformer, batch: Batch) -> torch.Tensor:
    """Mean token log-prob of each sequence's answer, teacher-forced [n_seq]."""
    b = batch.to(model.device)
    h = model(b.input_ids, return_hidden=True, select=b.sel)
    tok = target_logprobs(h, model.head_weight, b.targets)
    sums, counts = per_sequence(tok, b.seq, b.n_seq)
    return sums / counts


@torch.no_grad()
def perplexity(model: Transformer, enc: Encoder, texts: list[str], batch_size: int = 32) -> float:
    nll, n = 0.0, 0
    for b in range(0, len(texts), batch_size):
        pairs = []
        for t in texts[b:b + batch_size]:
            ids = enc.tok(t).input_ids
            if len(ids) >= 2:
                pairs.append((ids[:1], ids[1:]))
        if not pairs:
            continue
        batch = make_batch(pairs).to(model.device)
        h = model(batch.input_ids, return_hidden=True, select=batch.sel)
        tok = target_logprobs(h, model.head_weight, batch.targets)
        nll -= float(tok.double().sum())
        n += tok.numel()
    return math.exp(nll / max(n, 1))


def evaluate(model: Transformer, enc: Encoder, facts: list[Fact], retain_texts: list[str] | None = None,
             replace: bool = False, max_new_tokens: int = 24, progress: bool = False,
             dist: Dist | None = None) -> Evaluation:
    """METRICS of `facts` (recall of targets, paraphrases, neighbours; answer log-prob; retain perplexity).
    Under data parallel each rank generates its share of the prompts; under FSDP every rank runs every
    forward (the sharded blocks all-gather in lockstep), so there the work is not split."""
    probes = build_probes(facts)
    split = dist if dist is not None and not dist.fsdp else None
    mine = shard(probes, split)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="evaluating", unit="prompt", leave=False)
    try:
        gens = unshard(greedy_answers(model, enc, mine, max_new_tokens, progress=bar), len(probes), split)
    finally:
        if bar is not None:
            bar.close()
    hits = [answers_with(g, p.target) for g, p in zip(gens, probes)]
    replaced = [answers_with(g, p.replacement) if (replace and p.kind in ("forget", "paraphrase") and p.replacement)
                else None for g, p in zip(gens, probes)]
    lp = answer_logprobs(model, make_batch([enc.pair(f.prompt, f.target, f.chat) for f in facts]))
    ppl = perplexity(model, enc, retain_texts) if retain_texts else None
    counts = {k: sum(p.kind == k for p in probes) for k in ("forget", "paraphrase", "indirect", "neighbor")}
    return Evaluation(probes, gens, hits, replaced, float(lp.mean()), ppl, counts)


# -- what a reader sees: report.md, the terminal table, eval --show -----------------------------------------
RULE = ("Recall is the share of prompts whose greedy answer gives the target (its first line names it). Forget "
        "recall counts every forget prompt; paraphrase and neighbour recall count the prompts the base model "
        "answered with the target, before and after alike, so their 'before' is 1.00 and 'after' says how many "
        "of those still answer.")


@dataclass
class PromptRow:
    kind: str
    prompt: str
    target: str
    before: str | None  # the first line of the base model's answer (None: not evaluated)
    after: str
    mark: str  # "leak", "flipped", "replaced", "not replaced" or ""


def prompt_rows(before: Evaluation | None, after: Evaluation, replace: bool = False) -> list[PromptRow]:
    """Every prompt's answer before -> after, marked: a forget or paraphrase prompt that still gives the target
    is a leak (suppress) or shows whether the replacement came out (replace); a neighbour the base model
    answered that no longer does has flipped."""
    rows = []
    for i, (p, gen, hit) in enumerate(zip(after.probes, after.generations, after.hits)):
        was = before.hits[i] if before is not None else None
        if p.kind == "neighbor":
            mark = "flipped" if was and not hit else ""
        elif replace and after.replaced[i] is not None:
            mark = "replaced" if after.replaced[i] else "not replaced"
        else:
            mark = "leak" if hit else ""
        rows.append(PromptRow(p.kind, p.prompt, p.target, first_line(before.generations[i]) if before is not None
                              else None, first_line(gen), mark))
    return rows


def _cell(text: str | None, width: int = 70) -> str:
    return "—" if text is None else " ".join(text.split()).replace("|", "\\|")[:width]


def rows_markdown(rows: list[PromptRow]) -> list[str]:
    lines = ["| kind | prompt | target | before | after | |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = f"**{r.mark.upper()}**" if r.mark in ("leak", "flipped", "not replaced") else r.mark
        lines.append(f"| {r.kind} | {_cell(r.prompt)} | {_cell(r.target, 30)} | {_cell(r.before)} | "
                     f"{_cell(r.after)} | {mark} |")
    return lines


def rows_text(rows: list[PromptRow]) -> str:
    """eval --show: one block per prompt, marks in capitals."""
    out = []
    for r in rows:
        mark = f"  [{r.mark.upper()}]" if r.mark else ""
        out.append(f"{r.kind:<10} {' '.join(r.prompt.split())[:90]!r} -> {r.target!r}{mark}")
        if r.before is not None:
            out.append(f"{'':<10}   before: {r.before[:90]!r}")
        out.append(f"{'':<10}   {'after: ' if r.before is not None else 'answer:'} {r.after[:90]!r}")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def report_markdown(model_name: str, config: dict, before: dict, after: dict, cost: dict,
                    rows: list[PromptRow] | None = None) -> str:
    lines = ["# lune_fast unlearning report", "", f"Model: `{model_name}`  ", f"Mode: {config.get('mode')}, "
             f"objective: {config.get('objective')}, LoRA r={config.get('rank')} on "
             f"{','.join(config.get('targets', []))}, layers {config.get('layers_spec')}", "",
             "| metric | before | after |", "|---|---|---|"]
    for k in METRIC_KEYS:
        lines.append(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |")
    lines += ["", RULE, "", "| cost | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in cost.items()]
    if rows:
        marked = sum(r.mark in ("leak", "flipped", "not replaced") for r in rows)
        lines += ["", f"## Every prompt ({len(rows)}; {marked} marked)", "",
                  "LEAK: still gives the target; FLIPPED: a neighbour the base model answered that no longer does; "
                  "NOT REPLACED: the replacement did not come out.", ""] + rows_markdown(rows)
    return "\n".join(lines) + "\n"


COUNTED = {"forget_recall": "forget", "paraphrase_recall": "paraphrase", "indirect_recall": "indirect",
           "neighbor_recall": "neighbor", "replacement_rate": "forget", "paraphrase_replacement_rate": "paraphrase"}


def counted(before: Evaluation | None) -> dict:
    """How many prompts of each kind the recall figures count: every forget prompt, and the others the base
    model answered (RULE)."""
    if before is None:
        return {}
    return {k: sum(p.kind == k and (hit or k == "forget") for p, hit in zip(before.probes, before.hits))
            for k in ("forget", "paraphrase", "indirect", "neighbor")}


def metrics_table(before: dict, after: dict, counts: dict | None = None) -> str:
    """A terminal table of METRICS before/after (with how many prompts each recall counts), and the rule."""
    w = max(len(k) for k in METRIC_KEYS)
    counts = counts or {}
    rows = [f"{'metric':<{w}}  {'before':>9}  {'after':>9}  {'prompts':>7}", "-" * (w + 31)]
    def n(k):  # how many prompts a recall figure counts, where it has one
        measured = k in COUNTED and counts and (before.get(k) is not None or after.get(k) is not None)
        return _fmt(counts.get(COUNTED[k])) if measured else ""

    rows += [f"{k:<{w}}  {_fmt(before.get(k)):>9}  {_fmt(after.get(k)):>9}  {n(k):>7}" for k in METRIC_KEYS]
    return "\n".join(rows) + "\n" + textwrap.fill(RULE, 100)
