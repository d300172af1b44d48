"""End-to-end training step on a GPU at real model sizes (random weights: no downloads on the device).

    lune-fast bench e2e-gpu [--shapes llama-3.2-1b,llama-3-8b] [--tokens 8192] [--seq 1024] [--answer 64]
                            [--objective npo,ga] [--steps 6] [--json OUT] [--device cuda]

A Llama-architecture model of the named shape, rank-16 LoRA on all seven projections of every layer, bf16,
N tokens per step (rows of --seq tokens, the last --answer tokens of each row the answer). Variants:
- lune_fast: the trainer as users get it (default LoRA backend: the torch addmm chain on cuBLAS; fused head
  op at answer positions; cached reference);
- lune_triton: the same trainer with the fused Triton LoRA kernels (backend="triton");
- hf_peft: transformers' LlamaForCausalLM (SDPA) + PEFT, bf16 adapters, full logits, NPO reference via
  disable_adapter() each step.
Reports tokens/s, peak memory, and MFU counting 4·P·N FLOPs per step (forward + input-gradient of the frozen
base; no weight gradients) plus attention, against the bf16 matmul rate measured first (bench lora's
measure_rates: warmed up, median of repeats, random operands).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from .harness import report
from .lora import measure_rates, model_shapes


def _config_dict(shape: dict) -> dict:
    return {"model_type": "llama", "vocab_size": shape["vocab_size"], "hidden_size": shape["hidden_size"],
            "intermediate_size": shape["intermediate_size"], "num_hidden_layers": shape["num_hidden_layers"],
            "num_attention_heads": shape["num_attention_heads"], "num_key_value_heads": shape["num_key_value_heads"],
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": False}


def _random_model(cfg_dict: dict, dtype, device):
    from ..model import ModelConfig, Transformer

    m = Transformer(ModelConfig.from_dict(cfg_dict), dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return m


def _batch(vocab: int, tokens: int, seq: int, answer: int):
    from ..data import make_batch

    g = torch.Generator().manual_seed(1)
    rows = max(1, tokens // seq)
    pairs = []
    for _ in range(rows):
        ids = torch.randint(10, vocab, (seq + 1,), generator=g).tolist()
        pairs.append((ids[: seq + 1 - answer], ids[seq + 1 - answer:]))
    return make_batch(pairs), pairs


def _params(cfg: dict) -> int:
    h, m, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * m) + V * h  # the head counts once (embedding is a lookup)


def _start_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float | None:
    """Peak device memory since _start_memory (CUDA only: the CPU smoke run has no such counter)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def run_lune(cfg: dict, batch, objective: str, steps: int, backend: str, device) -> dict:
    from .. import lora
    from ..trainer import RunOptions, TrainData, TrainSettings, train

    model = _random_model(_config_dict(cfg), torch.bfloat16, device)
    _start_memory(device)
    settings = TrainSettings(objective=objective, lr=1e-4, steps=steps, stop_prob=0.0)
    lora.attach(model, lora.LoraSettings(rank=16, alpha=32, targets=tuple(lora.TARGETS), layers=()),
                seed=settings.seed, backend=backend)
    out = train(model, TrainData([batch]), settings, RunOptions(progress=False))
    _sync(device)
    peak = _peak_gib(device)
    del model
    return {"step_s": statistics.median(out.step_seconds[1:] or out.step_seconds), "peak_gib": peak}


def run_peft(cfg: dict, pairs, objective: str, steps: int, device) -> dict:
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in _config_dict(cfg).items() if k != "model_type"},
                         attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                          task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    ids = torch.tensor([p + a for p, a in pairs], device=device)
    labels = ids.clone()
    for i, (p, _) in enumerate(pairs):
        labels[i, : len(p)] = -100
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def seq_logp(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        lab = labels[:, 1:]
        return (lp.gather(-1, lab.clamp_min(0)[..., None])[..., 0] * (lab != -100)).sum(-1)

    _start_memory(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        seq = seq_logp(pm(input_ids=ids).logits)
        if objective == "npo":
            with torch.no_grad(), pm.disable_adapter():
                ref = seq_logp(pm(input_ids=ids).logits)
            loss = (F.softplus(0.1 * (seq - ref)) * 20).mean()
        else:
            loss = seq.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = _peak_gib(device)
    del pm, model, opt
    return {"step_s": statistics.median(times[1:] or times), "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench e2e-gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--answer", type=int, default=64)
    ap.add_argument("--objective", default="npo,ga")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", default="lune_fast,lune_triton,hf_peft")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the same code small (a smoke check)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench e2e-gpu: no CUDA device here; nothing measured (run it on a GPU, e.g. benchmarks/gpu_suite.sh)")
        return 0
    device = torch.device(a.device)
    peak_flops = measure_rates(a.device, torch.bfloat16)[0]
    rows = []
    for shape_name in a.shapes.split(","):
        cfg = model_shapes(shape_name)
        batch, pairs = _batch(cfg["vocab_size"], a.tokens, a.seq, a.answer)
        tokens = sum(len(p) + len(q) - 1 for p, q in pairs)
        flops = 4 * _params(cfg) * tokens + 4 * cfg["num_hidden_layers"] * len(pairs) * a.seq ** 2 * cfg["hidden_size"]
        for objective in a.objective.split(","):
            res = {}
            for variant in a.variants.split(","):
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                try:
                    if variant == "hf_peft":
                        res[variant] = run_peft(cfg, pairs, objective, a.steps, device)
                    else:
                        res[variant] = run_lune(cfg, batch.to(device), objective, a.steps,
                                                "triton" if variant == "lune_triton" else "auto", device)
                except torch.OutOfMemoryError:
                    res[variant] = {"step_s": None, "peak_gib": None, "error": "out of memory"}
            lune = res.get("lune_fast", {})
            for variant, r in res.items():
                t = r.get("step_s")
                rows.append({"shape": shape_name, "objective": objective, "variant": variant,
                             "tokens/s": tokens / t if t else None, "peak_GiB": r.get("peak_gib"),
                             "MFU": flops / t / peak_flops if t else None,
                             "speedup_vs_this": (t / lune["step_s"]) if (t and lune.get("step_s")) else None,
                             "memory_vs_this": (lune["peak_gib"] / r["peak_gib"]) if (r.get("peak_gib") and
                                                                                      lune.get("peak_gib")) else None,
                             "error": r.get("error")})
    report(f"measured bf16 matmul: {peak_flops / 1e12:.0f} TFLOP/s; {a.tokens} tokens per step; speedup_vs_this = "
           f"variant step time / lune_fast step time; memory_vs_this = lune_fast peak / variant peak", rows, a.json,
           peak_flops=peak_flops)
    return 0
