"""Unlearning objectives as functions of per-token target log-probs.

Every objective reads the [n_tokens] vector of log p(target token) that `target_logprobs` computes from
hidden states at answer positions only, through the fused head op (lune_fast.ops.linear_logprob): the
objectives never see logits, so none of them materialises the N×V matrix.

Notation: for sequence i, ℓ_i = mean_t log p(y_it), S_i = Σ_t log p(y_it); ref_t is log p(y_t) under the
frozen base (cached once) and S_ref_i its sum. Per-sequence weights w_i (0 or 1) let a fact that is already
forgotten stop contributing gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import linear_logprob

OBJECTIVES = ("npo", "npo_tok", "ga", "ul", "simnpo", "replace")
REFERENCE_OBJECTIVES = ("npo", "npo_tok")  # the ones that read the reference log-probs


def target_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per answer token from final-norm hidden states [n, H] at answer positions."""
    return linear_logprob(hidden, head, targets)


def per_sequence(tok_logp: torch.Tensor, seq: torch.Tensor, n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums S_i, token counts) of per-token values grouped by sequence index."""
    sums = torch.zeros(n_seq, dtype=tok_logp.dtype, device=tok_logp.device).index_add(0, seq, tok_logp)
    counts = torch.zeros(n_seq, dtype=tok_logp.dtype, device=tok_logp.device).index_add(
        0, seq, torch.ones_like(tok_logp))
    return sums, counts.clamp_min(1)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1)


def per_sequence_loss(objective: str, tok_logp: torch.Tensor, seq: torch.Tensor, n_seq: int,
                      ref_tok: torch.Tensor | None = None, beta: float | None = None,
                      simnpo_delta: float = 0.0) -> torch.Tensor:
    """The objective's value for each sequence [n_seq]."""
    sums, counts = per_sequence(tok_logp, seq, n_seq)
    mean = sums / counts
    if objective == "ga":  # push the answer's likelihood down, unbounded
        return mean
    if objective == "ul":  # unlikelihood: -log(1 - p) per token, bounded below by 0
        ul = -torch.log(-torch.expm1(tok_logp.clamp(max=-1e-6)))
        ul_sum, _ = per_sequence(ul, seq, n_seq)
        return ul_sum / counts
    if objective in REFERENCE_OBJECTIVES and ref_tok is None:
        raise ValueError(f"{objective} needs the reference per-token log-probs")
    if objective == "npo":
        b = 0.1 if beta is None else beta
        return F.softplus(b * (sums - per_sequence(ref_tok, seq, n_seq)[0])) * (2.0 / b)
    if objective == "npo_tok":
        # NPO per token: each token's gradient weight 2·σ(β(log p_t − ref_t)) fades once that token is unlikely,
        # so the step goes to the answer tokens the model still predicts (often the first) instead of pushing
        # down tokens that are already gone.
        b = 1.0 if beta is None else beta
        tok = F.softplus(b * (tok_logp - ref_tok)) * (2.0 / b)
        tok_sum, _ = per_sequence(tok, seq, n_seq)
        return tok_sum / counts
    if objective == "simnpo":  # reference-free and length-normalised
        b = 4.5 if beta is None else beta
        return F.softplus(b * (mean + simnpo_delta)) * (2.0 / b)
    if objective == "replace":  # SFT towards the replacement (or refusal) answer
        return -mean
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def forget_loss(objective: str, tok_logp: torch.Tensor, seq: torch.Tensor, n_seq: int,
                ref_tok: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                beta: float | None = None, simnpo_delta: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Mean over sequences (weighted by `weights`), or with reduction="sum" the weighted sum, which the
    trainer divides by a count taken over every micro-batch and rank."""
    values = per_sequence_loss(objective, tok_logp, seq, n_seq, ref_tok, beta, simnpo_delta)
    if reduction == "sum":
        return (values * weights).sum() if weights is not None else values.sum()
    return _weighted_mean(values, weights)


def retain_nll(tok_logp: torch.Tensor) -> torch.Tensor:
    return -tok_logp.mean()


def retain_kl(logits: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ model) per retain token, averaged; ref_logprobs are the cached base log-softmax."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return F.kl_div(lp, ref_logprobs.float(), log_target=True, reduction="batchmean")
