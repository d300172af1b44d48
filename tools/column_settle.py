"""Column steps whose length settles: the experiment behind RESULTS.md section 11, "A settling column step".

    .venv/bin/python tools/column_settle.py bench stream --mode replace --facts F --per-request 100 --requests 1 \
        --settings '{"optimizer": "column", "lr": 2.0}' --out OUT

Runs any `lune-fast` command with lune_fast.optim.ColumnSteps.step replaced by a step whose length is kept per
column: halved when the column's gradient direction reverses (cosine with the last step's below 0), grown by 1.2
(up to lr) while it keeps its direction. A plain column step has one length whatever the gradient, so it swings
around an answer it must bring precisely over a threshold (replace mode on CounterFact: the 60-step cap); this one
settles. Not yet an option of the package: measured on two runs only.
"""
from __future__ import annotations

import sys

import torch

from lune_fast import optim

SHRINK, GROW = 0.5, 1.2


@torch.no_grad()
def settling_step(self, closure=None):
    for group in self.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            norms = p.grad.norm(dim=0, keepdim=True)
            u = p.grad / torch.where(norms > 0, norms, torch.ones_like(norms))
            state = self.state[p]
            f = torch.ones_like(norms)
            if "u" in state:
                cos = (u * state["u"]).sum(0, keepdim=True)
                f = torch.where(cos < 0, state["f"] * SHRINK,
                                torch.where(cos > 0, (state["f"] * GROW).clamp(max=1.0), state["f"]))
            state["u"], state["f"] = u, f
            p.sub_(group["lr"] * f * u)


if __name__ == "__main__":
    optim.ColumnSteps.step = settling_step
    from lune_fast.cli import main

    sys.exit(main(sys.argv[1:]))
