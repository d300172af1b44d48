"""Before/after METRICS of an unlearning run (the report.json contract in README.md), and report.md.

recall = fraction of prompts whose greedy continuation *answers* with the target: the first non-empty
line contains it as a whole word or phrase (case-insensitive, whitespace collapsed, plural s/es allowed).
Plain substring matching would count "He" in "Helium" or "watt" in "kilowatt".
"""
from __future__ import annotations

import math
import re
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
        got = generate(model, [prompts[i] for i in idx], max_new_tokens, eos_token_id=_eos(enc, model),
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


def _eos(enc: Encoder, model: Transformer) -> list[int]:
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


# -- report.md ----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def report_markdown(model_name: str, config: dict, before: dict, after: dict, cost: dict,
                    examples: list[tuple[str, str, str]] | None = None) -> str:
    lines = ["# lune_fast unlearning report", "", f"Model: `{model_name}`  ", f"Mode: {config.get('mode')}, "
             f"objective: {config.get('objective')}, LoRA r={config.get('rank')} on "
             f"{','.join(config.get('targets', []))}, layers {config.get('layers_spec')}", "",
             "| metric | before | after |", "|---|---|---|"]
    for k in METRIC_KEYS:
        lines.append(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |")
    lines += ["", "paraphrase and neighbor recall are measured on the prompts the base model answered.", "",
              "| cost | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in cost.items()]
    if examples:
        lines += ["", "| prompt | before | after |", "|---|---|---|"]
        for p, b, a in examples:
            cell = lambda s: first_line(s).replace("|", "\\|")[:80]  # noqa: E731
            lines.append(f"| {cell(p)} | {cell(b)} | {cell(a)} |")
    return "\n".join(lines) + "\n"


def metrics_table(before: dict, after: dict) -> str:
    """A terminal table of METRICS before/after."""
    w = max(len(k) for k in METRIC_KEYS)
    rows = [f"{'metric':<{w}}  {'before':>9}  {'after':>9}", "-" * (w + 22)]
    rows += [f"{k:<{w}}  {_fmt(before.get(k)):>9}  {_fmt(after.get(k)):>9}" for k in METRIC_KEYS]
    return "\n".join(rows)
