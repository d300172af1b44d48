"""Up-front resource checks: a run that cannot fit is refused before any work, with the numbers."""
from __future__ import annotations

from pathlib import Path

import torch

from .data import DataError
from .model import ModelConfig


class ResourceError(ValueError):
    """The request does not fit the model's context or the memory available."""


def check_context(lengths: list[tuple[str, int]], cfg: ModelConfig) -> None:
    """lengths: (record source, prompt+answer tokens). Refuse any longer than the model's context."""
    too_long = [(src, n) for src, n in lengths if n > cfg.max_position_embeddings]
    if too_long:
        shown = "; ".join(f"{src}: {n} tokens" for src, n in too_long[:3])
        raise DataError(f"{len(too_long)} record(s) exceed the model's context of {cfg.max_position_embeddings} "
                        f"tokens ({shown})")


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def step_bytes(cfg: ModelConfig, tokens: int, layers_run: int, dtype: torch.dtype) -> int:
    """Activation memory of one training step: what autograd keeps per token and layer (norm inputs, q/k/v,
    attention output, the MLP's gate/up/activation/product) plus the answer positions' head chunk."""
    per_token_layer = 6 * cfg.hidden_size + 4 * cfg.intermediate_size + 2 * cfg.num_attention_heads * cfg.head_dim
    elem = torch.finfo(dtype).bits // 8
    return tokens * layers_run * per_token_layer * elem


def split_by_tokens(pairs: list[tuple[list[int], list[int]]], max_tokens: int) -> list[list[tuple[list[int], list[int]]]]:
    """Consecutive groups of pairs with at most max_tokens tokens each (a longer single pair stays alone)."""
    groups, cur, n = [], [], 0
    for p in pairs:
        size = len(p[0]) + len(p[1])
        if cur and n + size > max_tokens:
            groups.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += size
    if cur:
        groups.append(cur)
    return groups


def check_memory(cfg: ModelConfig, micro_batch_tokens: int, layers_run: int, dtype: torch.dtype,
                 device: torch.device, budget_fraction: float = 0.8) -> int:
    need = step_bytes(cfg, micro_batch_tokens, layers_run, dtype)
    have = available_bytes(device)
    if need > budget_fraction * have:
        raise ResourceError(
            f"one training step needs about {need / 2**30:.2f} GiB of activations ({micro_batch_tokens} tokens x "
            f"{layers_run} layers), but {have / 2**30:.2f} GiB are available on {device}; lower "
            f"--max-batch-tokens (micro-batches are accumulated), or adapt fewer/higher layers")
    return need
