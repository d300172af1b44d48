"""Each objective's gradient, through our path (LoRA Function, prefix cache, fused head op), against a
float64 autograd reference with every formula written out here."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from lune_fast import lora, trainer
from lune_fast.data import make_batch
from lune_fast.weights import load_model

pytestmark = pytest.mark.numerics  # run again under other instruction sets (Makefile)

SETTINGS = lora.LoraSettings(rank=4, alpha=8, targets=("q", "v", "o", "gate", "up", "down"), layers=(1, 2))
PAIRS = [([3, 17, 42, 9], [100, 7]), ([5, 6], [11, 12, 13]), ([88, 1, 2], [150])]


def _formula(objective, lp_list, ref_toks):
    vals = []
    for lp, ref_t in zip(lp_list, ref_toks):
        mean, total, ref = lp.mean(), lp.sum(), ref_t.sum()
        vals.append({
            "ga": mean,
            "ul": (-torch.log(1 - lp.exp())).mean(),
            "npo": 2 / 0.1 * F.softplus(0.1 * (total - ref)),
            "npo_tok": (2 / 1.0 * F.softplus(1.0 * (lp - ref_t))).mean(),
            "simnpo": 2 / 4.5 * F.softplus(4.5 * mean),
            "replace": -mean,
        }[objective])
    return torch.stack(vals).mean()


def _adapted(tiny_llama, dtype):
    m = load_model(tiny_llama, dtype=dtype)
    adapters = lora.attach(m, SETTINGS, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
            a.lora_A.mul_(3)
    return m, adapters


@pytest.mark.parametrize("objective", ["ga", "ul", "npo", "npo_tok", "simnpo", "replace"])
def test_objective_gradients_match_float64(tiny_llama, objective, monkeypatch):
    batch = make_batch(PAIRS)
    # ours: float32, prefix cache below layer 1, answer positions only, fused head op
    m32, ad32 = _adapted(tiny_llama, torch.float32)
    part = trainer._precompute(m32, batch, L0=1)
    tok = trainer.target_logprobs(trainer._hidden_at_answers(m32, part, 1), m32.head_weight, batch.targets)
    loss = trainer.forget_loss(objective, tok, batch.seq, batch.n_seq, trainer._reference(m32, part, 1))
    loss.backward()

    # reference: float64, plain LoRA ops, full forward and full log_softmax
    monkeypatch.setattr(lora, "lora_linear", lambda x, w, b, A, B, s, backend: F.linear(x, w, b) + s * (x @ A.t()) @ B.t())
    m64, ad64 = _adapted(tiny_llama, torch.float64)
    for a in ad64.values():
        a.lora_A.data, a.lora_B.data = a.lora_A.data.double(), a.lora_B.data.double()
    logp = torch.log_softmax(m64(batch.input_ids), -1).reshape(-1, 211)
    with torch.no_grad(), lora.disabled(m64):
        ref_logp = torch.log_softmax(m64(batch.input_ids), -1).reshape(-1, 211)
    tok64 = logp[batch.sel, batch.targets]
    ref_tok = ref_logp[batch.sel, batch.targets]
    per_seq = [tok64[batch.seq == i] for i in range(batch.n_seq)]
    ref_toks = [ref_tok[batch.seq == i] for i in range(batch.n_seq)]
    loss64 = _formula(objective, per_seq, ref_toks)
    loss64.backward()

    assert rel_err(loss.detach(), loss64.detach()) <= 1e-5
    for name in ad32:
        for part_name in ("lora_A", "lora_B"):
            g32 = getattr(ad32[name], part_name).grad
            g64 = getattr(ad64[name], part_name).grad
            assert rel_err(g32, g64) <= 1e-4, (objective, name, part_name)


def test_weights_drop_finished_examples():
    tok = torch.tensor([-0.1, -0.2, -3.0, -0.5])
    seq = torch.tensor([0, 0, 1, 2])
    w = torch.tensor([1.0, 0.0, 1.0])
    full = trainer.forget_loss("ga", tok, seq, 3)
    weighted = trainer.forget_loss("ga", tok, seq, 3, weights=w)
    assert abs(float(full) - (-0.15 - 3.0 - 0.5) / 3) < 1e-6
    assert abs(float(weighted) - (-0.15 - 0.5) / 2) < 1e-6
