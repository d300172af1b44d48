"""Inference latency of an unmerged adapter (the "embed it in a latency-sensitive pipeline" case).

    lune-fast bench latency [--model default] [--prefill 512] [--decode 32] [--rank 16] [--targets all]
                            [--layers all] [--dtype auto] [--repeats 7] [--json OUT]

Same process, same weights: the base model, the model with a (random, non-zero) adapter left unmerged, the
same adapter merged into the weights, and the base model with lune_fast's CPU decoding ops switched off (the
few-rows product, and with it the one-op layer; the one-op decoding attention and RMSNorm: the torch path they
replace; "base, torch ops"). Prefill: one forward of --prefill tokens (batch 1). Decode: greedy
tokens one at a time with the KV cache, batch 1, per token. Overheads are relative to the base model
(goals on CUDA: prefill ≤ 3%, decode ≤ 5%, merged = base ± 1%).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from .harness import median_seconds, report


def _none(*args):
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="all")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from .. import lora
    from ..settings import resolve_dtype
    from ..generate import generate
    from ..weights import load_model

    dev = torch.device(a.device)
    model = load_model(a.model, dtype=resolve_dtype(a.dtype, dev), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 1, (1, a.prefill), generator=g).to(dev)
    prompt = ids[0, :16].tolist()

    def prefill():
        model(ids, return_hidden=True)

    def decode():
        generate(model, [prompt], a.decode, eos_token_id=[])

    settings = lora.LoraSettings(rank=a.rank, alpha=2 * a.rank, targets=lora.parse_targets(a.targets),
                                 layers=lora.parse_layers(a.layers, model.config.num_hidden_layers))

    def set_variant(variant: str) -> None:
        lora.detach(model)
        if variant != "base":
            adapters = lora.attach(model, settings, seed=0)
            with torch.no_grad():
                for m in adapters.values():
                    m.lora_B.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
            if variant == "merged":
                lora.merge(model)

    @contextlib.contextmanager
    def torch_ops(on: bool):
        import lune_fast.kernels.frozen_linear as fl
        import lune_fast.model as model_module

        saved = fl.FEW_ROWS, model_module.decode_attention, model_module.rms_norm_op
        if on:
            fl.FEW_ROWS, model_module.decode_attention, model_module.rms_norm_op = 0, _none, _none
        try:
            yield
        finally:
            fl.FEW_ROWS, model_module.decode_attention, model_module.rms_norm_op = saved

    # rounds over the variants (A B C A B C ...) so that the machine's drifting load hits each alike;
    # each figure is the median over rounds of a median over repeats
    variants = ("base", "unmerged", "merged", "base, torch ops")
    samples = {v: ([], []) for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            set_variant(v.split(",")[0])
            with torch.inference_mode(), torch_ops(v.endswith("torch ops")):
                samples[v][0].append(median_seconds(prefill, a.repeats, 1, sync))
                samples[v][1].append(median_seconds(decode, max(2, a.repeats // 3), 1, sync))
    lora.detach(model)
    med = {v: (statistics.median(p), statistics.median(d)) for v, (p, d) in samples.items()}
    base_p, base_d = med["base"]
    rows = [{"variant": v, "prefill_ms": 1e3 * p, "prefill_overhead_%": 100 * (p / base_p - 1),
             "decode_ms_per_token": 1e3 * d / a.decode, "decode_overhead_%": 100 * (d / base_d - 1)}
            for v, (p, d) in med.items()]
    report(f"{a.model} {model.dtype} on {dev}; adapter r={a.rank} on {a.targets}, layers {a.layers}; "
           f"prefill {a.prefill} tokens, decode {a.decode} tokens (batch 1)", rows, a.json, rank=a.rank,
           targets=a.targets)
    return 0
