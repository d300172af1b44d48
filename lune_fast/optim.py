"""The optimisers a run can take: AdamW, and column-normalised gradient steps for keyed adapters.

A keyed adapter's column i of B is the value its layer writes when it reads fact i's subject (lune_fast.keyed);
what reaches other inputs is (a_i·x) b_i, so every unit of |b_i| that does not lower the fact's answer is damage
elsewhere. AdamW moves each coordinate by about lr a step whatever its gradient (a sign-like step): b_i grows in
all out_features directions, most of them useless. A column step moves b_i by lr along its own gradient,

    b_i ← b_i − lr · g_i / |g_i|         (each column of each adapted B on its own)

so b_i stays in the span of the directions that lower its answer. On facts-dev, 8 requests of 8 into one state,
it took 68 steps instead of 143 and halved the mean KL divergence from the base model on the listed neighbours
(RESULTS.md section 11, "Column steps").

A plain column step has one length whatever the gradient, so it swings around an answer it must bring precisely
over a threshold (replace mode on CounterFact: the 60-step cap). "settle" keeps a length per column, halved when
the column's gradient reverses and grown back towards lr while it keeps its direction (section 11, "A settling
column step").

The column steps and the schedule are not torch.optim classes: constructing a torch.optim.Optimizer imports
torch._dynamo (its methods are wrapped to keep the compiler out), 2.5-3 s of a process's first request on 2
cores — of every `lune-fast unlearn` on the default (keyed) adapter, which needs nothing else from it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

OPTIMIZERS = ("adamw", "column", "settle")
COLUMN_STEPS = ("column", "settle")  # the optimisers that step a keyed adapter's columns


class ColumnSteps:
    """b ← (1 − lr·wd) b − lr · g / |g| per column of each 2-D parameter (a column with no gradient stays).

    settle: each column's length is kept, halved when its gradient reverses direction and grown ×1.2 back up to
    lr while it keeps it. The parts of torch.optim.Optimizer's interface the trainer uses: param_groups, state,
    step, zero_grad."""
    SHRINK, GROW = 0.5, 1.2

    def __init__(self, params, lr: float, weight_decay: float = 0.0, settle: bool = False):
        self.param_groups = [{"params": list(params), "lr": lr, "weight_decay": weight_decay}]
        self.state: dict[torch.Tensor, dict] = defaultdict(dict)
        self.settle = settle

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                norms = p.grad.norm(dim=0, keepdim=True)
                u = p.grad / torch.where(norms > 0, norms, torch.ones_like(norms))
                p.sub_(group["lr"] * (self._length(p, u) * u if self.settle else u))

    def _length(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Each column's share of lr this step [1, columns], from the cosine of its direction with the last one's."""
        state = self.state[p]
        f = torch.ones_like(u[:1])
        if "u" in state:
            cos = (u * state["u"]).sum(0, keepdim=True)
            f = torch.where(cos < 0, state["f"] * self.SHRINK,
                            torch.where(cos > 0, (state["f"] * self.GROW).clamp(max=1.0), state["f"]))
        state["u"], state["f"] = u, f
        return f


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, weight_decay: float):
    if name in COLUMN_STEPS:
        return ColumnSteps(params, lr, weight_decay, settle=name == "settle")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Schedule:
    """lr = each group's initial lr × factor(step), as torch's LambdaLR sets it (factor(0) from the start, the
    next one at each step()), with the state a checkpoint keeps (last_epoch, _step_count, _last_lr)."""

    def __init__(self, optimizer, factor: Callable[[int], float]):
        self.optimizer, self.factor = optimizer, factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch, self._step_count = -1, 0
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        self._step_count += 1
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "_last_lr": list(self._last_lr),
                "base_lrs": list(self.base_lrs)}
