"""Batched greedy decoding with a KV cache, as gpt-fast's generate.py: left-padded prompts, rows that finish
leave the batch, and an optional stop at the end of the first non-empty line (all that recall reads)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import AttnMask, KVCache, Transformer, allowed_keys


@dataclass
class LineStop:
    """Per-token facts that let greedy decoding stop at the end of the first non-empty line (all that recall
    reads): `closing` tokens end a line that has text before their newline, `newline` tokens end a line,
    `content` tokens hold some non-whitespace text. bool [vocab] each."""
    closing: torch.Tensor
    newline: torch.Tensor
    content: torch.Tensor

    @classmethod
    def from_texts(cls, texts: list[str], vocab: int, device) -> "LineStop":
        def mask(pred):
            m = torch.zeros(max(vocab, len(texts)), dtype=torch.bool)
            m[[i for i, s in enumerate(texts) if pred(s)]] = True
            return m.to(device)

        return cls(mask(lambda s: "\n" in s and s.split("\n", 1)[0].strip() != ""), mask(lambda s: "\n" in s),
                   mask(lambda s: s.strip() != ""))

    def after(self, tokens: list[int], eos: set[int]) -> tuple[bool, bool]:
        """(finished, started) after an answer's tokens, as generate() decides them token by token."""
        finished = started = False
        for t in tokens:
            finished = t in eos or bool(self.closing[t]) or (bool(self.newline[t]) and started)
            started = started or bool(self.content[t])
        return finished, started


def choose(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of logits [B, V]: the largest (temperature 0), or drawn from softmax(logits /
    temperature) within the smallest set of tokens whose probability reaches top_p (with `generator`: the same
    draws for the same logits)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def stream(model: Transformer, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = None,
           temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None):
    """One prompt's new tokens, yielded as each is decoded (KV cache; `choose` picks them). Ends at an
    end-of-sequence token (not yielded) or after max_new_tokens."""
    cfg, dev = model.config, model.device
    eos = set(cfg.eos_token_id if eos_token_id is None else
              ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
    T = len(prompt)
    cache = KVCache(cfg, 1, T + max_new_tokens, model.dtype, dev)
    h = model.run_layers(model.embed(torch.tensor([prompt], device=dev)), torch.arange(T, device=dev)[None],
                         AttnMask(), cache=cache)
    cache.length = T
    for t in range(max_new_tokens):
        tok = int(choose(model.logits(model.norm(h[:, -1])).float(), temperature, top_p, generator)[0])
        if tok in eos:
            return
        yield tok
        if t == max_new_tokens - 1:
            return
        h = model.run_layers(model.embed(torch.tensor([[tok]], device=dev)), torch.tensor([[T + t]], device=dev),
                             AttnMask(), cache=cache)
        cache.length = T + t + 1


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 24,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, return_logprobs: bool = False,
             stop: LineStop | None = None, temperature: float = 0.0, generator: torch.Generator | None = None,
             started: list[bool] | None = None):
    """Greedy decoding for a batch of token-id prompts (left padded, KV cache). Returns the new tokens of
    each prompt, cut after the first end-of-sequence token (or, with `stop`, after the end of the first
    non-empty line), and with return_logprobs each chosen token's log-probability. A row that has finished
    leaves the batch, so the rest decode at the smaller batch. temperature > 0 samples each token from the
    softmax of logits / temperature instead (with `generator`: the same draws for the same logits).
    `started`: per prompt, whether its first non-empty line has already begun within the prompt (a prompt
    that ends in part of an answer, LineStop.after)."""
    if not prompts:
        return ([], []) if return_logprobs else []
    cfg, dev = model.config, model.device
    eos = set(cfg.eos_token_id if eos_token_id is None else
              ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    key_mask = torch.zeros(B, T + max_new_tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        key_mask[i, T - len(p):] = True
    key_mask[:, T:] = True
    ids, key_mask = ids.to(dev), key_mask.to(dev)
    positions = (key_mask[:, :T].long().cumsum(-1) - 1).clamp_min(0)
    cache = KVCache(cfg, B, T + max_new_tokens, model.dtype, dev)
    # Decode steps need an explicit mask when rows are padded (sliding windows are each layer's: AttnMask.windowed)
    explicit = not bool(key_mask[:, :T].all())
    mask = AttnMask(False, allowed_keys(key_mask[:, :T], T)) if explicit else AttnMask()
    h = model.run_layers(model.embed(ids), positions, mask, cache=cache)
    cache.length = T
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=dev)
    scores = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
    rows = torch.arange(B, device=dev)  # the original index of each row still decoding
    # its first non-empty line has begun
    started = torch.tensor(started, dtype=torch.bool, device=dev) if started is not None else \
        torch.zeros(B, dtype=torch.bool, device=dev)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=dev)
    next_pos = positions[:, -1:] + 1
    for t in range(max_new_tokens):
        logits = model.logits(model.norm(h[:, -1])).float()
        tok = choose(logits, temperature, 1.0, generator)
        out[rows, t] = tok
        if return_logprobs:
            scores[rows, t] = logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        finished = torch.isin(tok, eos_t)
        if stop is not None:
            finished |= stop.closing[tok] | (stop.newline[tok] & started)
            started |= stop.content[tok]
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            rows, tok, started, next_pos, key_mask = rows[keep], tok[keep], started[keep], next_pos[keep], key_mask[keep]
            cache.keep_rows(keep)
        L = cache.length + 1
        step_mask = AttnMask(False, allowed_keys(key_mask[:, :L], 1, offset=L - 1)) if explicit else AttnMask()
        h = model.run_layers(model.embed(tok[:, None]), next_pos, step_mask, cache=cache)
        cache.length = L
        next_pos = next_pos + 1
    # a row left the batch right after its last token (end of sequence or of the line): -1 from there on
    lengths = (out >= 0).sum(-1).tolist()
    result = [row[:n] for row, n in zip(out.tolist(), lengths)]
    logps = [lp[:n] for lp, n in zip(scores.tolist(), lengths)]
    return (result, logps) if return_logprobs else result
