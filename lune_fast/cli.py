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

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


MODEL_HELP = ("model folder (config.json + safetensors), 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' "
              "(both embedded: installed and converted once)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="frozen weights' dtype; auto = bfloat16 where the hardware runs it natively")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


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
    p.add_argument("--mode", default=d.mode, choices=["suppress", "replace"])
    p.add_argument("--adapter", default=None, choices=["keyed", "plain"],
                   help="keyed (default): A fixed to the facts' subject keys whitened against preserved text, B "
                        "trained, rank = number of facts; plain: ordinary LoRA (the default under --fsdp)")
    p.add_argument("--objective", default=None, choices=OBJECTIVES, help=f"default: {_defaults('objective')}")
    p.add_argument("--retain", help="facts whose answers must be kept (NLL or KL retain term)")
    p.add_argument("--retain-text", help="texts for retain perplexity (default: the package's own)")
    p.add_argument("--rank", type=int, default=d.rank, help="plain adapters (keyed: one rank per fact)")
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--targets", default=None,
                   help=f"q,k,v,o,gate,up,down (or all, mlp, attn); default: {_defaults('targets')}")
    p.add_argument("--layers", default=None,
                   help=f"e.g. 3-9, 3,5,9, 10%%-30%% (of the depth), all, or auto[:W] (causal tracing); default: "
                        f"{_defaults('layers')}")
    p.add_argument("--steps", type=int, default=d.steps, help="maximum optimiser steps")
    keyed_steps = "; ".join(f"{o} {lr['suppress']:g} / {lr['replace']:g}" for o, lr in KEYED_LR.items())
    p.add_argument("--lr", type=float, default=None,
                   help=f"default: {_defaults('lr')} (keyed, by --optimizer, suppress / replace: {keyed_steps}); "
                        f"with column steps it is the length of each fact's step; the keyed default is scaled down "
                        f"where the adapted projections' outputs are far under rms 1 (Gemma 3 270M: x0.2; "
                        f"report.json config.lr_scale); "
                        f"a given --lr is used as it is")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help=f"default: {_defaults('optimizer')}, and adamw where the keyed step is scaled down (Gemma 3); "
                        f"column: each fact's column of B steps lr along its own gradient (keyed adapters only); "
                        f"settle: column steps whose length per column halves when its gradient reverses")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--schedule", default=d.schedule, choices=["constant", "cosine"])
    p.add_argument("--beta", type=float, default=None, help="NPO/SimNPO beta")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop-prob", type=float, default=None,
                   help=f"suppress: stop when every answer's mean token probability is below this; default: "
                        f"{_defaults('stop_prob')}")
    p.add_argument("--replace-prob", type=float, default=d.replace_prob)
    p.add_argument("--negatives", default=d.negatives, choices=["gold", "self", "both"],
                   help="suppress: train against the gold target, the model's own answer up to it, or both")
    p.add_argument("--per-example-stop", action=argparse.BooleanOptionalAction, default=d.per_example_stop,
                   help="an answer already below --stop-prob stops contributing gradient")
    p.add_argument("--hold-done", action=argparse.BooleanOptionalAction, default=d.hold_done,
                   help="keyed: a fact whose answers are past the threshold keeps its column of B (no momentum "
                        "carries it on)")
    p.add_argument("--hold-margin", type=float, default=d.hold_margin,
                   help="with --hold-done: held once this factor past the threshold (suppress: below "
                        "stop-prob x margin)")
    p.add_argument("--recall-rounds", type=int, default=d.recall_rounds,
                   help="suppress: ask the prompts again after training and train on any answer that still comes "
                        "out by another route, up to N times")
    p.add_argument("--prompt-variants", type=int, default=None,
                   help=f"also train each fact after N prefixes such as 'Here is a fact.'; default: "
                        f"{_defaults('prompt_variants')}")
    p.add_argument("--robust-to", choices=list(QUANTS), default=None,
                   help="suppress: the recall rounds check the model as its GGUF export at this type answers, so "
                        "that the forgetting survives `lune-fast export --quant` (use with --recall-rounds >= 1)")
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
    p.add_argument("--preserve-weight", type=float, default=d.preserve_weight,
                   help="weight of the penalty on the adapted projections' output change on the preserved inputs")
    p.add_argument("--retain-loss", default=d.retain_loss, choices=["nll", "kl"])
    p.add_argument("--retain-weight", type=float, default=d.retain_weight)
    p.add_argument("--refusals", help="replace mode: file of refusal answers for records without a replacement")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="tokens per micro-batch (gradients are accumulated over micro-batches; a step holds one "
                        "micro-batch's activations)")
    p.add_argument("--anchors", type=int, default=None,
                   help=f"retain anchors per fact: its prompt with other subjects, kept by the retain term; default: "
                        f"{_defaults('anchors')}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lune-fast", description="Fast LLM unlearning with LoRA and negative examples")
    sub = ap.add_subparsers(dest="command", required=True)

    u = sub.add_parser("unlearn", help="train an adapter that forgets (or replaces) the given facts")
    u.add_argument("--forget", required=True, help="facts JSONL, TOFU QA or CounterFact records")
    where = u.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder: adapter + report.json + report.md")
    where.add_argument("--into", help="a lifelong state folder (created the first time): the request joins the "
                                      "earlier ones in its one PEFT adapter, with a line in its ledger.jsonl")
    _add_model_args(u)
    _add_train_args(u)
    u.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    u.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    u.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    u.add_argument("--quiet", action="store_true")
    u.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen blocks with FSDP2")

    e = sub.add_parser("eval", help="METRICS of a model (with an optional adapter) on facts")
    e.add_argument("--facts", required=True)
    e.add_argument("--adapter", help="adapter folder (PEFT format)")
    e.add_argument("--json", help="write the METRICS object here")
    e.add_argument("--replace", action="store_true", help="also measure replacement_rate")
    e.add_argument("--retain-text")
    _add_model_args(e)

    r = sub.add_parser("revoke", help="withdraw one request from a lifelong state: its facts come back")
    r.add_argument("--into", required=True, help="the state folder")
    r.add_argument("--request", required=True, help="the request id (see `lune-fast ledger DIR`)")
    r.add_argument("--no-eval", action="store_true", help="skip measuring the revoked and remaining facts")
    r.add_argument("--retain-text")
    _add_model_args(r)

    g = sub.add_parser("ledger", help="the history of a lifelong state: requests, revocations, metrics")
    g.add_argument("state", help="the state folder")
    g.add_argument("--json", action="store_true", help="the ledger lines as they are")

    m = sub.add_parser("merge", help="write the model with the adapter merged (safetensors + config)")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    _add_model_args(m)

    from .export import QUANTS

    x = sub.add_parser("export", help="write the model, with an adapter merged, as a GGUF for llama.cpp/Ollama")
    which = x.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="adapter folder (PEFT format); without it, the model as it is")
    which.add_argument("--into", help="a state folder that holds one PEFT adapter (the same as --adapter DIR)")
    x.add_argument("--gguf", required=True, help="output .gguf file")
    x.add_argument("--quant", default="f16", choices=list(QUANTS),
                   help="the blocks' type (q4_*: the embedding at q8_0, as llama.cpp's own quantizer does)")
    x.add_argument("--name", help="general.name in the file (default: the model folder's name)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--model", default="default", help=MODEL_HELP)

    b = sub.add_parser("bench", help="benchmarks: forward, frozen-linear, logprob, lora, e2e, kernels, quality, "
                                     "stream")
    b.add_argument("what", choices=["forward", "frozen-linear", "logprob", "lora", "kernels", "e2e", "e2e-gpu",
                                      "latency", "quality", "stream"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark (see --help)")

    d = sub.add_parser("demo", help="unlearn a few of the package's facts on the default model")
    d.add_argument("--facts", type=int, default=8, help="how many of the shipped facts to forget")
    d.add_argument("--out", default=None, help="also save the adapter and report here")
    _add_model_args(d)
    return ap


def _settings_from_args(a) -> dict:
    from .settings import Settings

    names = {f.name for f in fields(Settings)}
    return {k: v for k, v in vars(a).items() if k in names and v is not None}


def _forget(u, a, **where):
    """The forget() call both kinds of `unlearn` make, from the command line's settings."""
    return u.forget(a.forget, retain=a.retain, retain_texts=a.retain_text, progress=not a.quiet,
                    evaluate_before=not a.no_eval, evaluate_after=not a.no_eval, **where, **_settings_from_args(a))


def _print_outcome(result, a, done: str | None) -> None:
    for line in result.skipped:
        print(f"lune-fast: skipped {line}", file=sys.stderr)
    if not a.quiet:
        print(result.table())
        print(json.dumps(result.cost))
    if done:
        print(done)
    _warn_unmet(result, a)


def cmd_unlearn(a) -> int:
    from .api import Unlearner
    from .io import OutputExistsError

    if a.into:
        return _unlearn_into(a)
    out = Path(a.out)
    ckpt = out.with_name(out.name + ".ckpt")
    if out.exists() and not a.overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if ckpt.exists() and not a.resume:
        raise OutputExistsError(f"{ckpt} holds the checkpoint of an interrupted run; pass --resume to continue "
                                f"it, or remove the folder to start again")
    u = Unlearner(a.model, dtype=a.dtype, device=a.device, fsdp=a.fsdp)
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
    return 0


def _unlearn_into(a) -> int:
    from .api import Unlearner
    from .settings import SettingsError

    if a.resume or a.fsdp or a.overwrite:
        raise SettingsError("--into updates a state in place, one process: --resume, --fsdp and --overwrite do not "
                            "apply (a request that fails leaves the state as it was)")
    result = _forget(Unlearner(a.model, dtype=a.dtype, device=a.device), a, into=a.into)
    if result.error:
        print(f"lune-fast: {result.error}; the state in {a.into} is unchanged", file=sys.stderr)
        return EXIT_DIVERGED
    done = f"request {result.request_id} added to {a.into} ({len(result.facts)} facts)"
    fix = result.cost.get("neighbor_repair") or {}
    if fix.get("request"):
        done += (f"; {len(fix['repaired'])} listed neighbour(s) that earlier requests had flipped were put back by "
                 f"request {fix['request']}")
    _print_outcome(result, a, done)
    return 0


def _warn_unmet(result, a) -> None:
    """A request that ended without meeting its criterion says which facts, and what to change."""
    if not result.still_known:
        return
    shown = "; ".join(repr(p) for p in result.still_known[:5]) + (" ..." if len(result.still_known) > 5 else "")
    print(f"lune-fast: warning: after {result.cost['steps']} steps ({result.stopped}) {len(result.still_known)} "
          f"fact(s) still answer as before: {shown}. Raise --steps (now {a.steps}) or --lr, or revoke the request "
          f"and send those facts again with --recall-rounds higher", file=sys.stderr)


def cmd_revoke(a) -> int:
    from .api import Unlearner

    u = Unlearner(a.model, dtype=a.dtype, device=a.device)
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
    from .api import Unlearner
    from .evaluate import evaluate
    from .io import atomic_write_text

    u = Unlearner(a.model, dtype=a.dtype, device=a.device)
    if a.adapter:
        lora.load_adapter(u.model, a.adapter)
    from .data import read_facts

    read = read_facts(a.facts)
    for line in read.skipped:
        print(f"lune-fast: skipped {line}", file=sys.stderr)
    ev = evaluate(u.model, u.encoder, read.facts, u.retain_texts(a.retain_text), replace=a.replace, progress=True)
    metrics = {**ev.metrics(), "counts": ev.counts}
    text = json.dumps(metrics, indent=2)
    if a.json:
        atomic_write_text(Path(a.json), text + "\n")
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
    from . import lora
    from .export import write_gguf
    from .io import OutputExistsError
    from .weights import load_model, resolve_model_dir

    if Path(a.gguf).exists() and not a.overwrite:  # before any work
        raise OutputExistsError(f"{a.gguf} already exists; pass --overwrite to replace it")
    folder = resolve_model_dir(a.model)
    model = load_model(folder)  # float32: each tensor is rounded once, to the file's type
    if a.adapter or a.into:
        lora.load_adapter(model, a.adapter or a.into)
        lora.merge_and_unload(model)
    out = write_gguf(model, folder, Path(a.gguf), a.quant, name=a.name, overwrite=a.overwrite)
    print(f"{a.quant} GGUF written to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_bench(a) -> int:
    from importlib import import_module

    mod = import_module(f".bench.{a.what.replace('-', '_')}", __package__)
    return mod.main(a.args) or 0


def cmd_demo(a) -> int:
    import json as _json

    from .api import Unlearner
    from .assets import asset

    records = [_json.loads(line) for line in asset("facts.jsonl").read_text().splitlines()]
    # Spread the picks over categories, so the neighbours of the forgotten facts are mostly kept facts.
    step = max(1, len(records) // a.facts)
    chosen = records[::step][: a.facts]
    print(f"lune_fast demo: forgetting {len(chosen)} facts the default model knows:")
    for r in chosen:
        print(f"  - {r['prompt']} {r['target']}")
    u = Unlearner(a.model, dtype=a.dtype, device=a.device)
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


COMMANDS = {"unlearn": cmd_unlearn, "revoke": cmd_revoke, "ledger": cmd_ledger, "eval": cmd_eval, "merge": cmd_merge,
            "export": cmd_export, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .export import ExportError
    from .io import OutputExistsError
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
            SettingsError, ResourceError, ExportError, StateError) as e:
        print(f"lune-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
