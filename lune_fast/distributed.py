"""Running under torchrun: the forget set split across ranks, adapter gradients all-reduced, every decision
(stop, divergence) taken from all-reduced values so that no rank waits on another forever.

Data parallel: every rank holds the whole frozen model and the (small) adapter; after backward the adapter
gradients are flattened into one bucket and all-reduced (SUM: the loss is normalised by global counts, so the
sum is the full-batch gradient). Communication per step = 4 bytes × trainable parameters, against a step's
forward+backward of 4·P·tokens FLOPs (see benchmarks/RESULTS.md for the arithmetic).

FSDP2 (`--fsdp`): each transformer block is `fully_shard`ed, frozen weights and adapters alike; the blocks
all-gather their weights inside forward/backward (so the fused kernels and the head op see plain tensors)
and reduce-scatter the adapter gradients. The embedding, final norm and head stay replicated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import lora


@dataclass
class Dist:
    rank: int
    world: int
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool, device) -> bool:
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """One bucketed all-reduce of every adapter gradient (skipped under FSDP, which reduce-scatters)."""
        if self.fsdp:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def close(self) -> None:
        """Every rank ends together and the process group is torn down before exit (a rank that leaves while
        another still uses the group can abort it)."""
        dist.barrier()
        dist.destroy_process_group()


def from_env(fsdp: bool = False, device: torch.device | None = None) -> Dist | None:
    """The process group of a torchrun launch (gloo on CPU, NCCL on CUDA), or None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), fsdp)


def shard(items: list, d: Dist | None) -> list:
    """This rank's share of a list (every world-th item)."""
    return items if d is None else items[d.rank::d.world]


def unshard(mine: list, n: int, d: Dist | None) -> list:
    """The inverse of `shard`: every rank's share gathered back into the whole list, in its order."""
    if d is None:
        return mine
    parts: list = [None] * d.world
    dist.all_gather_object(parts, mine)
    out: list = [None] * n
    for r, part in enumerate(parts):
        out[r::d.world] = part
    return out


def fully_shard_blocks(model) -> None:
    """FSDP2 over the transformer blocks (frozen weights and adapters); the rest stays replicated."""
    from torch.distributed.fsdp import fully_shard

    model.pack_weights(False)  # FSDP refills the unsharded parameters in place: no copy may outlive a refill
    for block in model.layers:
        fully_shard(block)


def reshard_blocks(model) -> None:
    """Back to the sharded parameters after forwards outside training (evaluation, generation keep the
    blocks unsharded), so that parameters collected now are the sharded DTensors."""
    for block in model.layers:
        if hasattr(block, "reshard"):
            block.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) parameter or state tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter in PEFT's format as plain tensors, gathered from every rank's shards under FSDP."""
    reshard_blocks(model)
    return lora.adapter_state(model, whole=full)
