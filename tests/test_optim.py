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
