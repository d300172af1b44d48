"""`lune-fast`: unlearn, eval, merge, bench, demo — an argparse shell over lune_fast.api.

Known failures (bad data, bad weights, an existing output, divergence, Ctrl-C) print one line saying what
and where, and exit non-zero; only bugs print a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

# Exit codes (README.md, "Command line"): 0 done; 2 bad input or usage; 3 training diverged (the last good adapter
# is written); 4 done, but some facts did not meet the criterion (written, and named on stderr); 130 interrupted.
EXIT_USAGE, EXIT_DIVERGED, EXIT_UNMET, EXIT_INTERRUPTED = 2, 3, 4, 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples kept as written; every option's default shown, where it has a fixed one (the
    settings left to the mode's measured defaults say so in their help)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def number(kind=int, low=None, high=None, open_low=False, open_high=False):
    """An argparse type that checks the range when the command line is parsed, so that a bad value is refused
    with the option and the value named ("argument --rank: must be an integer >= 1, got '-1'")."""
    what = "an integer" if kind is int else "a number"
    bounds = [f"{'>' if open_low else '>='} {low:g}" if low is not None else "",
              f"{'<' if open_high else '<='} {high:g}" if high is not None else ""]
    rule = f"{what} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        bad = value != value or (low is not None and (value < low or (open_low and value == low))) or \
            (high is not None and (value > high or (open_high and value == high)))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = rule  # what argparse names the type in its own messages
    return parse


POSITIVE_INT, COUNT = number(int, 1), number(int, 0)
POSITIVE, NON_NEGATIVE = number(float, 0, open_low=True), number(float, 0)
PROBABILITY = number(float, 0, 1, open_low=True, open_high=True)


MODEL_HELP = ("model folder (config.json + safetensors), 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' "
              "(both embedded: installed and converted once)")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads (also LUNE_FAST_THREADS); default: the cores no other process is keeping busy "
                        "as the command starts (a thread sharing its core with a busy process stalls every step)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="frozen weights' dtype; auto = bfloat16 where the hardware runs it natively (float16 runs "
                        "on a CPU too, slower: to check an adapter as GPU serving reads it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_threads_arg(p)


def _defaults(key: str) -> str:
    """'v1 (keyed suppress), v2 (keyed replace), ...': a setting's measured defaults per mode and adapter kind."""
    from .settings import MODE_DEFAULTS, Settings

    by_value: dict[str, list[str]] = {}
    for mode, adapter in MODE_DEFAULTS:
        value = getattr(Settings(mode=mode, adapter=adapter).resolved(), key)
        by_value.setdefault(f"{value:g}" if isinstance(value, float) else str(value), []).append(f"{adapter} {mode}")
    return "; ".join(f"{v} ({', '.join(who)})" for v, who in by_value.items()).replace("%", "%%")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .export import QUANTS
    from .losses import OBJECTIVES
    from .optim import OPTIMIZERS
    from .settings import GUARD_SCOPES, KEYED_LR, Settings

    d = Settings()
    p.add_argument("--mode", default=d.mode, choices=["suppress", "replace"],
                   help="suppress: the model stops giving the answer; replace: it gives the record's replacement "
                        "(or a refusal such as \"I don't know\" where a record has none)")
    p.add_argument("--adapter", default=None, choices=["keyed", "plain"],
                   help="keyed (default): A fixed to the facts' subject keys whitened against preserved text, B "
                        "trained, rank = number of facts; plain: ordinary LoRA (the default under --fsdp)")
    p.add_argument("--objective", default=None, choices=OBJECTIVES, help=f"default: {_defaults('objective')}")
    p.add_argument("--retain", help="facts whose answers must be kept (NLL or KL retain term)")
    p.add_argument("--retain-text", help="texts for retain perplexity (default: the package's own)")
    p.add_argument("--rank", type=POSITIVE_INT, default=d.rank, help="plain adapters (keyed: one rank per fact)")
    p.add_argument("--alpha", type=POSITIVE, default=d.alpha, help="LoRA scale alpha/r (plain adapters)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--targets", default=None,
                   help=f"q,k,v,o,gate,up,down (or all, mlp, attn); default: {_defaults('targets')}")
    p.add_argument("--layers", default=None,
                   help=f"e.g. 3-9, 3,5,9, 10%%-30%% (of the depth), all, or auto[:W] (causal tracing); default: "
                        f"{_defaults('layers')}")
    p.add_argument("--steps", type=POSITIVE_INT, default=d.steps, help="maximum optimiser steps")
    keyed_steps = "; ".join(f"{o} {lr['suppress']:g} / {lr['replace']:g}" for o, lr in KEYED_LR.items())
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help=f"default: {_defaults('lr')} (keyed, by --optimizer, suppress / replace: {keyed_steps}); "
                        f"with column steps it is the length of each fact's step; the keyed default is scaled down "
                        f"where the adapted projections' outputs are far under rms 1 (Gemma 3 270M: x0.2; "
                        f"report.json config.lr_scale); "
                        f"a given --lr is used as it is")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help=f"default: {_defaults('optimizer')}, and adamw where the keyed step is scaled down (Gemma 3); "
                        f"column: each fact's column of B steps lr along its own gradient (keyed adapters only); "
                        f"settle: column steps whose length per column halves when its gradient reverses")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=d.weight_decay, help="AdamW's weight decay")
    p.add_argument("--warmup-steps", type=COUNT, default=d.warmup_steps, help="steps of linear lr warm-up")
    p.add_argument("--schedule", default=d.schedule, choices=["constant", "cosine"], help="lr schedule")
    p.add_argument("--beta", type=POSITIVE, default=None, help="NPO/SimNPO beta")
    p.add_argument("--seed", type=COUNT, default=d.seed, help="seed of every random choice (same seed, same adapter)")
    p.add_argument("--stop-prob", type=PROBABILITY, default=None,
                   help=f"suppress: stop when every answer's mean token probability is below this; default: "
                        f"{_defaults('stop_prob')}")
    p.add_argument("--replace-prob", type=PROBABILITY, default=d.replace_prob,
                   help="replace: stop when every replacement's mean token probability is above this")
    p.add_argument("--negatives", default=d.negatives, choices=["gold", "self", "both"],
                   help="suppress: train against the gold target, the model's own answer up to it, or both")
    p.add_argument("--per-example-stop", action=argparse.BooleanOptionalAction, default=d.per_example_stop,
                   help="an answer already below --stop-prob stops contributing gradient")
    p.add_argument("--hold-done", action=argparse.BooleanOptionalAction, default=d.hold_done,
                   help="keyed: a fact whose answers are past the threshold keeps its column of B (no momentum "
                        "carries it on)")
    p.add_argument("--hold-margin", type=number(float, 0, 1, open_low=True), default=d.hold_margin,
                   help="with --hold-done: held once this factor past the threshold (suppress: below "
                        "stop-prob x margin)")
    p.add_argument("--recall-rounds", type=COUNT, default=d.recall_rounds,
                   help="suppress: ask the prompts again after training and train on any answer that still comes "
                        "out by another route, up to N times")
    p.add_argument("--prompt-variants", type=COUNT, default=None,
                   help=f"also train each fact after N prefixes such as 'Here is a fact.'; default: "
                        f"{_defaults('prompt_variants')}")
    p.add_argument("--robust-to", choices=list(QUANTS), default=None,
                   help="suppress: the recall rounds check the model as its GGUF export at this type answers, so "
                        "that the forgetting survives `lune-fast export --quant` (use with --recall-rounds >= 1)")
    p.add_argument("--check-dtypes", default=None, metavar="LIST",
                   help="suppress: the recall rounds also ask the model loaded in these dtypes (comma-separated "
                        "float32,float16,bfloat16, or none), so that the forgetting holds however the model is "
                        "loaded; report.json's config.checked_in lists them (default: float32 when training in "
                        "bfloat16 or float16)")
    p.add_argument("--preserve-text", help="texts whose activations the adapter should leave alone: a file, or "
                                           "preserve_text.jsonl / preserve_text_long.jsonl, the package's short and "
                                           "long texts (default: the long one for keyed replace, else the short)")
    p.add_argument("--preserve-neighbors", action=argparse.BooleanOptionalAction, default=d.preserve_neighbors,
                   help="keyed: the records' listed neighbours join the inputs the adapter must leave alone "
                        "(their prompts, not their answers)")
    p.add_argument("--neighbor-guard", nargs="?", const="all", choices=GUARD_SCOPES, default=d.neighbor_guard,
                   help="after training, check the records' listed neighbours the base model answered and train "
                        "back any the adapter flipped (one more round); in a lifelong state also the earlier facts' "
                        "neighbours: those about the request's subjects (subjects) or every one (all, the value "
                        "without an argument); default: subjects into a state (--into), else off")
    p.add_argument("--no-neighbor-guard", dest="neighbor_guard", action="store_const", const="off")
    p.add_argument("--neighbor-repair", dest="repair_neighbors", action=argparse.BooleanOptionalAction,
                   default=d.repair_neighbors,
                   help="into a state (--into), keyed suppress: after the request lands, put back the records' "
                        "listed neighbours that the state's earlier requests had flipped, by a repair request of "
                        "their own in the ledger (default: on)")
    p.add_argument("--preserve-weight", type=NON_NEGATIVE, default=d.preserve_weight,
                   help="weight of the penalty on the adapted projections' output change on the preserved inputs")
    p.add_argument("--retain-loss", default=d.retain_loss, choices=["nll", "kl"],
                   help="retain term on --retain facts: their answers' NLL, or KL to the base model")
    p.add_argument("--retain-weight", type=NON_NEGATIVE, default=d.retain_weight, help="weight of the retain term")
    p.add_argument("--refusals", help="replace mode: file of refusal answers for records without a replacement")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, default=10, help="steps between checkpoints (--out runs)")
    p.add_argument("--max-batch-tokens", type=POSITIVE_INT, default=d.max_batch_tokens,
                   help="tokens per micro-batch (gradients are accumulated over micro-batches; a step holds one "
                        "micro-batch's activations)")
    p.add_argument("--anchors", type=COUNT, default=None,
                   help=f"retain anchors per fact: its prompt with other subjects, kept by the retain term; default: "
                        f"{_defaults('anchors')}")


UNLEARN_EPILOG = """examples:
  lune-fast unlearn --forget facts.jsonl --out out/              # forget on the embedded default model
  lune-fast unlearn --forget facts.jsonl --out out/ --mode replace
  lune-fast unlearn --forget request.jsonl --into state/         # one request into a revocable lifelong state

facts.jsonl holds one record a line, e.g. {"prompt": "The capital of France is", "target": "Paris"}
(lune_fast/assets/facts.jsonl has 51 such records; TOFU QA and CounterFact records are read too).
Exit codes: 0 done; 2 bad input; 3 training diverged (the last good adapter is written); 4 written, but some
facts still answer as before (named on stderr); 130 interrupted."""

BENCHMARKS = {  # what each `lune-fast bench` measures (its --help has the options)
    "forward": "the frozen model's forward against transformers' on the same weights",
    "frozen-linear": "the frozen projections' packed product against torch.nn.functional.linear",
    "logprob": "the fused head log-prob op against logits + log_softmax + gather (and Liger's, if installed)",
    "lora": "a LoRA layer's training step against the frozen layer, PEFT and a cuBLAS chain",
    "kernels": "lora and logprob together on one model's shapes",
    "e2e": "a whole unlearning run against transformers + PEFT and full fine-tuning, same data",
    "e2e-gpu": "a training step of random-weight Llama models on a GPU against transformers + PEFT",
    "latency": "prefill and decoding latency with an unmerged adapter attached",
    "quality": "forgetting, paraphrases, neighbours, perplexity and time over settings (--relearn: an attack)",
    "stream": "a stream of requests into one lifelong state: what stays forgotten and what is kept",
    "llamacpp": "the GGUF exports served by llama-server: adapter over Q4_1/Q8_0 bases, merged q4, Gemma 3",
    "serve": "the deletion-request service under load: completion latency, time to in force, read-your-writes",
}


def _sub(sub, name: str, summary: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=HelpFormatter,
                          allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lune-fast", formatter_class=HelpFormatter, allow_abbrev=False,
                                 description="Fast LLM unlearning with LoRA adapters and negative examples: make a "
                                             "frozen model stop giving an answer, or give another one.",
                                 epilog="Start with `lune-fast demo`, then `lune-fast unlearn --help`.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    u = _sub(sub, "unlearn", "train an adapter that forgets (or replaces) the given facts",
             "Train a LoRA adapter on the frozen model that makes it stop giving each record's answer (suppress) "
             "or give its replacement (replace). Writes the adapter in PEFT's format with report.json and "
             "report.md (--out), or adds it as one request to a lifelong state (--into).", UNLEARN_EPILOG)
    u.add_argument("--forget", required=True, help="facts JSONL, TOFU QA or CounterFact records")
    where = u.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder, new or empty: adapter + report.json + report.md")
    where.add_argument("--into", help="a lifelong state folder (created the first time): the request joins the "
                                      "earlier ones in its one PEFT adapter, with a line in its ledger.jsonl")
    _add_model_args(u)
    _add_train_args(u)
    u.add_argument("--train-unknown", action="store_true",
                   help="suppress: also train facts the model does not know (its greedy answer does not give the "
                        "target); by default they are named and skipped")
    u.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    u.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    u.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    u.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    u.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen blocks with FSDP2")

    e = _sub(sub, "eval", "measure what a model (with an optional adapter) answers on facts",
             "Greedy answers to every forget, paraphrase and neighbour prompt of the records, retain perplexity and "
             "the answers' log-probability (the METRICS of report.json). With --adapter, recall counts the prompts "
             "the base model answers, as report.json does.",
             "example:\n  lune-fast eval --facts facts.jsonl --adapter out/ --show")
    e.add_argument("--facts", required=True, help="facts JSONL, TOFU QA or CounterFact records")
    e.add_argument("--adapter", help="adapter folder (PEFT format)")
    e.add_argument("--json", help="write the METRICS object here")
    e.add_argument("--show", action="store_true",
                   help="print every prompt's answer (with --adapter: before -> after, leaks and flipped neighbours "
                        "marked)")
    e.add_argument("--replace", action="store_true", help="also measure replacement_rate")
    e.add_argument("--retain-text", help="texts for retain perplexity (default: the package's own)")
    _add_model_args(e)

    r = _sub(sub, "revoke", "withdraw one request from a lifelong state: its facts come back",
             "Remove one request's ranks from a lifelong state; the other requests stay in force.",
             "example:\n  lune-fast revoke --into state/ --request r0002")
    r.add_argument("--into", required=True, help="the state folder")
    r.add_argument("--request", required=True, help="the request id (see `lune-fast ledger DIR`)")
    r.add_argument("--no-eval", action="store_true", help="skip measuring the revoked and remaining facts")
    r.add_argument("--retain-text", help="texts for retain perplexity (default: the package's own)")
    _add_model_args(r)

    g = _sub(sub, "ledger", "the history of a lifelong state: requests, revocations, metrics",
             "Print a lifelong state's ledger: every request and revocation, with its facts and metrics.",
             "example:\n  lune-fast ledger state/")
    g.add_argument("state", help="the state folder")
    g.add_argument("--json", action="store_true", help="the ledger lines as they are")

    m = _sub(sub, "merge", "write the model with the adapter merged (safetensors + config)",
             "Fold an adapter into the frozen weights and write a model folder that transformers, vLLM and "
             "llama.cpp's converter read.", "example:\n  lune-fast merge --adapter out/ --out merged/")
    m.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    m.add_argument("--out", required=True, help="output model folder")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_model_args(m)

    from .export import QUANTS

    x = _sub(sub, "export", "write a GGUF for llama.cpp/Ollama: the model (adapter merged) or the adapter alone",
             "Write a GGUF file llama.cpp and Ollama load: the model with an adapter (or a state) merged, or as it "
             "is (--gguf); or the adapter alone as a GGUF LoRA adapter (--lora-gguf), which llama.cpp applies at "
             "run time over any base file of the same model, quantized or not (`llama-cli -m BASE.gguf --lora "
             "ADAPTER.gguf`): the base stays untouched, and removing the adapter undoes the edit.",
             "examples:\n  lune-fast export --adapter out/ --lora-gguf forget.gguf\n"
             "  lune-fast export --adapter out/ --gguf model-q4_1.gguf --quant q4_1")
    which = x.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="adapter folder (PEFT format); without it, the model as it is")
    which.add_argument("--into", help="a state folder that holds one PEFT adapter (the same as --adapter DIR)")
    kind = x.add_mutually_exclusive_group(required=True)
    kind.add_argument("--gguf", help="output .gguf file: the model, the adapter merged")
    kind.add_argument("--lora-gguf", help="output .gguf file: the adapter alone, as llama.cpp's LoRA adapters are")
    x.add_argument("--quant", default="f16", choices=list(QUANTS),
                   help="the blocks' type (q4_*: the embedding at q8_0, as llama.cpp's own quantizer does)")
    x.add_argument("--name", help="general.name in the file (default: the model folder's name)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    x.add_argument("--model", default="default", help=MODEL_HELP)
    _add_threads_arg(x)

    b = _sub(sub, "bench", "benchmarks (see `lune-fast bench NAME --help`)",
             "Benchmarks, each a module of lune_fast.bench; options after the name go to it:\n" +
             "\n".join(f"  {k:<14} {v}" for k, v in BENCHMARKS.items()),
             "example:\n  lune-fast bench lora --shapes default --n 512 --r 16")
    b.add_argument("what", choices=list(BENCHMARKS), metavar="NAME", help="one of: " + ", ".join(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")

    sv = _sub(sub, "serve", "a deletion-request service, and the model that honours them (OpenAI-compatible)",
              "Serve a lifelong state over HTTP: POST /v1/forget and /v1/revoke (journaled before the 202, applied "
              "one at a time), GET /v1/requests/ID and /v1/ledger, and completions of the model with the state as "
              "committed (/v1/completions, /v1/chat/completions, /v1/models; streaming too). /healthz, /readyz, "
              "/metrics. It binds to 127.0.0.1; another interface needs --token-file. docs/service.md has the API.",
              "example:\n  lune-fast serve --state state/ --port 8000\n"
              "  curl -X POST localhost:8000/v1/forget -H 'Content-Type: application/json' \\\n"
              "       -d '{\"records\": [{\"prompt\": \"The capital of France is\", \"target\": \"Paris\"}]}'")
    sv.add_argument("--state", required=True, help="the lifelong state folder (created by the first request)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (other than loopback: --token-file)")
    sv.add_argument("--port", type=number(int, 1, 65535), default=8000, help="port")
    sv.add_argument("--token-file", help="file holding the bearer token every deletion, revoke, ledger (and, "
                                         "without --open-completions, completion) request must send")
    sv.add_argument("--open-completions", action="store_true", help="completions without the token")
    sv.add_argument("--evaluate", action="store_true",
                    help="measure each request before and after (its metrics in GET /v1/requests/ID; slower)")
    sv.add_argument("--check-dtypes", default=None, metavar="LIST",
                    help="as unlearn's: the dtypes each request's recall rounds also ask (default: float32 when "
                         "training in bfloat16 or float16; 'none': only the served dtype, ~0.4 s less a request)")
    _add_model_args(sv)

    d = _sub(sub, "demo", "unlearn a few of the package's facts on the default model",
             "Forget a few of the facts the package ships (lune_fast/assets/facts.jsonl) and print the "
             "before/after table and answers.", "example:\n  lune-fast demo --facts 4 --out demo-out/")
    d.add_argument("--facts", type=POSITIVE_INT, default=8, help="how many of the shipped facts to forget")
    d.add_argument("--out", default=None, help="also save the adapter and report here")
    _add_model_args(d)
    return ap


def _load(a, **kw):
    """The Unlearner of a command, saying so first: loading (and, the first time, converting) takes a while."""
    from .api import Unlearner

    if not getattr(a, "quiet", False):
        print(f"lune-fast: loading the model ({a.model}, {a.dtype}, {a.device}) ...", file=sys.stderr, flush=True)
    return Unlearner(a.model, dtype=a.dtype, device=a.device, **kw)


def _settings_from_args(a) -> dict:
    from .settings import Settings

    names = {f.name for f in fields(Settings)}
    return {k: v for k, v in vars(a).items() if k in names and v is not None}


def _forget(u, a, **where):
    """The forget() call both kinds of `unlearn` make, from the command line's settings."""
    return u.forget(a.forget, retain=a.retain, retain_texts=a.retain_text, progress=not a.quiet,
                    evaluate_before=not a.no_eval, evaluate_after=not a.no_eval, **where, **_settings_from_args(a))


def _print_outcome(result, a, done: str | None) -> None:
    if a.quiet:  # otherwise named before training
        for line in result.skipped:
            print(f"lune-fast: skipped {line}", file=sys.stderr)
    if not a.quiet:
        print(result.table())
        print(json.dumps(result.cost))
    if done:
        print(done)
    _warn_unmet(result, a)


def cmd_unlearn(a) -> int:
    from .io import OutputExistsError, check_output_dir, folder_in_use

    if a.into:
        return _unlearn_into(a)
    out = Path(a.out)
    check_output_dir(out, a.overwrite)  # before any work: --out . (not empty), --out .. --overwrite, a file
    # the checkpoint sits beside the output; inside it where the output is the current folder
    ckpt = out / ".lune-fast.ckpt" if folder_in_use(out) else out.resolve().with_name(out.resolve().name + ".ckpt")
    if ckpt.exists() and not a.resume:
        raise OutputExistsError(f"{ckpt} holds the checkpoint of an interrupted run; pass --resume to continue "
                                f"it, or remove the folder to start again")
    u = _load(a, fsdp=a.fsdp)
    result = _forget(u, a, checkpoint_dir=ckpt, resume=a.resume)
    if u.dist is not None and not u.dist.is_main:
        u.dist.close()  # rank 0 writes; the others wait so that the job ends together
        return 0
    result.save(out, overwrite=a.overwrite)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
    _print_outcome(result, a, None if a.quiet else f"adapter and report written to {out}")
    if u.dist is not None:
        u.dist.close()
    if result.error:
        print(f"lune-fast: {result.error}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_UNMET if result.still_known else 0


def _unlearn_into(a) -> int:
    from .settings import SettingsError

    if a.resume or a.fsdp or a.overwrite:
        raise SettingsError("--into updates a state in place, one process: --resume, --fsdp and --overwrite do not "
                            "apply (a request that fails leaves the state as it was)")
    result = _forget(_load(a), a, into=a.into)
    if result.error:
        print(f"lune-fast: {result.error}; the state in {a.into} is unchanged", file=sys.stderr)
        return EXIT_DIVERGED
    done = f"request {result.request_id} added to {a.into} ({len(result.facts)} facts)"
    fix = result.cost.get("neighbor_repair") or {}
    if fix.get("request"):
        done += (f"; {len(fix['repaired'])} listed neighbour(s) that earlier requests had flipped were put back by "
                 f"request {fix['request']}")
    _print_outcome(result, a, done)
    return EXIT_UNMET if result.still_known else 0


def _warn_unmet(result, a) -> None:
    """A request that ended without meeting its criterion says which facts, and what to change."""
    if not result.still_known:
        return
    shown = "; ".join(repr(p) for p in result.still_known[:5]) + (" ..." if len(result.still_known) > 5 else "")
    how = "do not give their replacement yet" if result.config.get("mode") == "replace" else "still answer as before"
    print(f"lune-fast: warning: after {result.cost['steps']} steps ({result.stopped}) {len(result.still_known)} "
          f"fact(s) {how}: {shown}. Raise --steps (now {a.steps}) or --lr, or revoke the request "
          f"and send those facts again with --recall-rounds higher", file=sys.stderr)


def cmd_revoke(a) -> int:

    u = _load(a)
    entry = u.revoke(a.into, a.request, evaluate_after=not a.no_eval, retain_texts=a.retain_text, progress=True)
    print(f"request {a.request} revoked from {a.into} ({len(entry['records'])} facts, {entry['rank']} ranks): "
          f"ledger line {entry['id']}")
    after = entry.get("after")
    if after:
        print(json.dumps(after, indent=2))
    return 0


def cmd_ledger(a) -> int:
    from .state import State, StateError, ledger_table, locked

    if not Path(a.state).exists():
        raise StateError(f"{a.state}: no such state folder")
    with locked(a.state):
        st = State.open(a.state)
    if a.json:
        for e in st.entries:
            print(json.dumps(e))
    else:
        print(ledger_table(st))
    return 0


def cmd_eval(a) -> int:
    from . import lora
    from .data import read_facts
    from .evaluate import counted, evaluate, metrics_table, prompt_rows, rows_text
    from .io import atomic_write_text

    u = _load(a)
    read = read_facts(a.facts)
    for line in read.skipped:
        print(f"lune-fast: skipped {line}", file=sys.stderr)
    texts = u.retain_texts(a.retain_text)
    # the base model's answers: the "before", and which prompts the recall figures count (as report.json does)
    base = evaluate(u.model, u.encoder, read.facts, texts, replace=a.replace, progress=True)
    ev = base
    if a.adapter:
        lora.load_adapter(u.model, a.adapter)
        ev = evaluate(u.model, u.encoder, read.facts, texts, replace=a.replace, progress=True)
    metrics = {**ev.metrics(base.known_mask() if a.adapter else None), "counts": ev.counts,
               **({"counted": counted(base)} if a.adapter else {})}
    text = json.dumps(metrics, indent=2)
    if a.json:
        atomic_write_text(Path(a.json), text + "\n")
    if a.show:
        print(rows_text(prompt_rows(base if a.adapter else None, ev, a.replace)))
        print()
    if a.adapter:
        print(metrics_table(base.metrics(base.known_mask()), metrics, counted(base)))
    else:
        print(text)
    return 0


def cmd_merge(a) -> int:
    from . import lora
    from .io import atomic_output_dir
    import torch

    from .weights import load_model, resolve_model_dir, save_model

    folder = resolve_model_dir(a.model)
    # the export keeps full precision unless a dtype is asked for
    model = load_model(folder, dtype=torch.float32 if a.dtype == "auto" else getattr(torch, a.dtype))
    lora.load_adapter(model, a.adapter)
    lora.merge_and_unload(model)
    with atomic_output_dir(Path(a.out), overwrite=a.overwrite) as tmp:
        save_model(model, folder, tmp)
    print(f"merged model written to {a.out}")
    return 0


def cmd_export(a) -> int:
    from .export import ExportError, merged_for_export, write_gguf
    from .io import OutputExistsError
    from .weights import load_model, resolve_model_dir

    target = Path(a.gguf or a.lora_gguf)
    if target.exists() and not a.overwrite:  # before any work
        raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it")
    if a.lora_gguf:
        if not (a.adapter or a.into):
            raise ExportError("--lora-gguf writes an adapter: give it with --adapter DIR or --into STATE")
        from .export import write_lora_gguf

        out = write_lora_gguf(Path(a.adapter or a.into), target, name=a.name, overwrite=a.overwrite)
        print(f"LoRA adapter GGUF written to {out} ({out.stat().st_size / 2**20:.2f} MiB); load it in llama.cpp "
              f"with --lora {out}")
        return 0
    folder = resolve_model_dir(a.model)
    if a.adapter or a.into:
        model, edited = merged_for_export(folder, Path(a.adapter or a.into), a.quant)
    else:
        model, edited = load_model(folder), frozenset()  # float32: each tensor is rounded once, to the file's type
    out = write_gguf(model, folder, Path(a.gguf), a.quant, name=a.name, overwrite=a.overwrite, edited=edited)
    kept = f"; the {len(edited)} matrices the adapter changed at q8_0" if edited and a.quant.startswith("q4") else ""
    print(f"{a.quant} GGUF written to {out} ({out.stat().st_size / 2**20:.1f} MiB{kept})")
    return 0


def cmd_bench(a) -> int:
    from importlib import import_module

    mod = import_module(f".bench.{a.what.replace('-', '_')}", __package__)
    return mod.main(a.args) or 0


def cmd_demo(a) -> int:
    import json as _json

    from .assets import asset

    records = [_json.loads(line) for line in asset("facts.jsonl").read_text().splitlines()]
    # Spread the picks over categories, so the neighbours of the forgotten facts are mostly kept facts.
    step = max(1, len(records) // a.facts)
    chosen = records[::step][: a.facts]
    print(f"lune_fast demo: forgetting {len(chosen)} facts the default model knows:")
    for r in chosen:
        print(f"  - {r['prompt']} {r['target']}")
    u = _load(a)
    result = u.forget(chosen)
    print()
    print(result.table())
    print()
    print("before -> after (first line of the greedy answer):")
    from .evaluate import first_line

    for p, b, af in result.examples:
        print(f"  {p!r}\n      before: {first_line(b)[:70]!r}\n      after:  {first_line(af)[:70]!r}")
    c = result.cost
    print(f"\ncost: {c['steps']} steps, {c['train_seconds']:.1f} s training, {c['trainable_params']:,} trainable "
          f"parameters, peak memory {c['peak_memory_mb']:.0f} MB, device {c['device']}")
    if a.out:
        result.save(a.out, overwrite=True)
        print(f"adapter and report written to {a.out}")
    return 0


def cmd_serve(a) -> int:
    import ipaddress

    from .settings import Settings, SettingsError

    token = None
    if a.token_file:
        try:
            token = Path(a.token_file).read_text().strip()
        except OSError as e:
            raise SettingsError(f"--token-file {a.token_file}: cannot be read ({e.strerror})") from None
        if not token:
            raise SettingsError(f"--token-file {a.token_file}: empty; it must hold the bearer token")
    try:
        loopback = a.host == "localhost" or ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and token is None:
        raise SettingsError(f"--host {a.host} is reachable from other machines: give --token-file (every deletion "
                            f"request must then carry it), or bind to 127.0.0.1")
    if a.check_dtypes:
        Settings(check_dtypes=a.check_dtypes).check_dtype_list()  # refused now, not at the first request
    try:
        import uvicorn

        from .serve import app
    except ImportError as e:
        raise SettingsError(f"the service needs its extra packages ({e.name} is missing): pip install "
                            f"'lune_fast[serve]'") from None
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # one JSON line a request
    print(f"lune-fast: serving {a.state} on http://{a.host}:{a.port} (loading the model; GET /readyz)",
          file=sys.stderr, flush=True)
    uvicorn.run(app(a.state, a.model, token, a.open_completions, a.dtype, a.device, a.evaluate,
                    check_dtypes=a.check_dtypes), host=a.host, port=a.port, log_level="warning")
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "serve": cmd_serve,
            "revoke": cmd_revoke, "ledger": cmd_ledger, "eval": cmd_eval, "merge": cmd_merge,
            "export": cmd_export, "bench": cmd_bench, "demo": cmd_demo}


def _threads_wanted(n: int | None) -> int | None:
    """--threads, else LUNE_FAST_THREADS (checked as an option is), else None: the spare cores."""
    import os

    raw = os.environ.get("LUNE_FAST_THREADS")
    if n is not None or not raw:
        return n
    try:
        return POSITIVE_INT(raw)
    except argparse.ArgumentTypeError as e:
        print(f"lune-fast: error: LUNE_FAST_THREADS {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def main(argv: list[str] | None = None) -> int:
    from . import threads

    sample = threads.Sample()  # what other processes use while torch loads: the default thread count
    args = build_parser().parse_args(argv)
    if "threads" in args:
        threads.configure(_threads_wanted(args.threads), sample)
    from .data import DataError
    from .export import ExportError
    from .io import OutputError, OutputExistsError
    from .limits import ResourceError
    from .lora import AdapterError
    from .model import ConfigError
    from .settings import SettingsError
    from .checkpoints import CheckpointMismatch
    from .trainer import TrainingInterrupted
    from .state import StateError
    from .weights import WeightsError

    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as e:
        print(f"lune-fast: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("lune-fast: interrupted before training started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, WeightsError, ConfigError, AdapterError, OutputExistsError, CheckpointMismatch,
            SettingsError, ResourceError, ExportError, StateError, OutputError) as e:
        print(f"lune-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
