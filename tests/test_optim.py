"""Column steps (lune_fast.optim): each column of B moves lr along its own gradient, and only where it has one."""
import torch

from lune_fast.optim import ColumnSteps


def test_each_column_moves_lr_along_its_own_gradient_and_an_idle_column_stays():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    start = b.detach().clone()
    grad = torch.randn(6, 4, generator=g, dtype=torch.float64) * torch.tensor([1e-6, 3.0, 0.0, 50.0],
                                                                              dtype=torch.float64)
    b.grad = grad.clone()
    ColumnSteps([b], lr=0.7).step()
    moved = b.detach() - start
    for j in (0, 1, 3):  # whatever the gradient's size, a step of 0.7 against it
        assert torch.allclose(moved[:, j].norm(), torch.tensor(0.7, dtype=torch.float64), rtol=1e-12)
        assert torch.allclose(moved[:, j], -0.7 * grad[:, j] / grad[:, j].norm(), rtol=1e-12)
    assert torch.equal(moved[:, 2], torch.zeros(6, dtype=torch.float64))  # no gradient: no step, no NaN


def test_weight_decay_shrinks_before_the_step():
    b = torch.full((3, 2), 2.0, dtype=torch.float64, requires_grad=True)
    b.grad = torch.zeros(3, 2, dtype=torch.float64)
    ColumnSteps([b], lr=0.5, weight_decay=0.1).step()
    assert torch.allclose(b.detach(), torch.full((3, 2), 2.0 * (1 - 0.05), dtype=torch.float64))


def test_a_settling_column_halves_its_step_when_its_gradient_reverses_and_grows_back_while_it_keeps_it():
    b = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    opt = ColumnSteps([b], lr=1.0, settle=True)
    lengths = []
    for sign in (1, -1, -1, -1, 1):  # column 0's gradient flips; column 1's keeps its direction
        before = b.detach().clone()
        b.grad = torch.tensor([[sign, 1.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
        opt.step()
        lengths.append((b.detach() - before).norm(dim=0).tolist())
    assert [round(x[0], 6) for x in lengths] == [1.0, 0.5, 0.6, 0.72, 0.36]
    assert all(abs(x[1] - 1.0) < 1e-12 for x in lengths)  # never reversed: always the whole lr


def test_the_schedule_sets_the_lrs_torchs_lambdalr_sets():
    """Schedule (not a torch.optim class: those import torch._dynamo) against LambdaLR on the same factor:
    warm-up, then cosine; the same lr at every step, and the state a checkpoint keeps."""
    import math

    from lune_fast.optim import Schedule

    def factor(step):
        return (step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 3) / 7)))

    ref_opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.3)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, factor)
    opt = ColumnSteps([torch.zeros(2, 2, requires_grad=True)], lr=0.3)
    ours = Schedule(opt, factor)
    for _ in range(12):
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        ref_opt.step()
        ref.step()
        ours.step()
    state = ours.state_dict()
    assert (state["last_epoch"], state["_step_count"], state["_last_lr"]) == (ref.last_epoch, ref._step_count,
                                                                             ref.get_last_lr())


def test_a_keyed_request_never_imports_torch_dynamo(tiny_lm, tmp_path):
    """Importing torch._dynamo takes 2.5-3 s on 2 cores: a keyed request (column steps) must not need it. In a
    fresh process, since this one may have imported it already. Column steps asked for: the tiny model's small
    outputs would take AdamW by default."""
    import json
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(f"""
import json, sys
from lune_fast.api import Unlearner
u = Unlearner({str(tiny_lm)!r}, dtype="float32")
r = u.forget([{{"prompt": "A baby cow is called a", "target": "calf"}}], progress=False, evaluate_before=False,
             evaluate_after=False, steps=3, stop_prob=1e-9, layers="1-2", optimizer="column")
print(json.dumps([r.config["adapter"], r.config["optimizer"], r.cost["steps"], "torch._dynamo" in sys.modules]))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    adapter, optimizer, steps, dynamo = json.loads(out.stdout.strip().splitlines()[-1])
    assert adapter == "keyed" and optimizer == "column" and steps >= 1
    assert dynamo is False
