"""Subject-keyed adapters: LoRA whose A reads only the forgotten facts' subjects (ROME/MEMIT's keys, as LoRA).

For an adapted down_proj at layer l, the key of fact i is the projection's input at the last token of the
fact's subject (found as for causal tracing), k_i [d]. With K = [k_1 .. k_n] and C the second moment of the
projection's inputs over preserved text (lune_fast.preserve), A is fixed to

    A = (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹        so that  A K = I  with the least  tr(A C Aᵀ)

(up to a small ridge, see set_keyed): the rows that answer 1 to their own subject and as little as possible to
everything the preserved text puts into that projection. Only B trains: column i is what the layer writes when
it reads subject i, the value of a rank-one edit. The adapter is still a plain LoRA (rank = number of facts),
loadable by PEFT.
"""
from __future__ import annotations

import re

import torch

from . import lora
from .data import Encoder, Fact
from .locate import prompt_offsets, subject_last_token
from .model import AttnMask, Transformer
from .preserve import Preserved


# Contexts the subject is also read in: a key averaged over them answers to the subject however it is asked
# about (ROME averages over random prefixes for the same reason).
CONTEXTS = ("{s}", "I was reading about {s}", "Tell me about {s}", "Here is a note on {s}",
            "We talked about {s}", "Q: What do you know about {s}", "The topic is {s}")


# Openings the facts are also trained after (Settings.prompt_variants takes the first N): a question-and-answer
# frame first, because paraphrases asked as questions are answered by restating the prompt after "A:".
PREFIXES = ("Q: Tell me about {s}.\nA: ", "Here is a fact. ", "I was reading about {s}. ")


def prefixed_prompts(enc: Encoder, f: Fact) -> list[str]:
    """The fact's prompt after each of PREFIXES (those naming the subject only where one is found)."""
    loc = subject_last_token(enc, f)
    subject = enc.decode(loc[0][loc[1]:loc[2] + 1]).strip() if loc else None
    return [p.format(s=subject) + f.prompt for p in PREFIXES if subject or "{s}" not in p]


# Words that say nothing about which fact a prompt is about (for prompts without a subject).
_FUNCTION_WORDS = set("""a an the of in on at to by for with from into onto and or but as is are was were be been being
its it this that these those there their his her which what who whom whose where when how why do does did
has have had called known name named type kind most more than also very q""".split())


def content_positions(enc: Encoder, f: Fact) -> tuple[list[int], list[int]]:
    """(prompt ids, positions of the last token of each content word of the prompt): the key of a fact with
    no subject is averaged over them ("A turtle is a type of" -> "turtle"), not read off the prompt's last
    token, which every prompt of the same template shares."""
    read = prompt_offsets(enc, f)
    if read is None:
        ids = enc.prompt_ids(f.prompt, f.chat)
        return ids, [len(ids) - 1]
    ids, offsets, shift = read
    ends = [m.end() + shift for m in re.finditer(r"[^\W\d_]{3,}", f.prompt)
            if m.group(0).lower() not in _FUNCTION_WORDS]
    positions = sorted({i for e in ends for i, (a, b) in enumerate(offsets) if a < e <= b})
    return ids, positions or [len(ids) - 1]


def key_positions(enc: Encoder, facts: list[Fact]) -> list[list[tuple[list[int], int]]]:
    """Per fact, the (token ids, key position) pairs its key is averaged over: the prompt at its subject's last
    token and the subject in each of CONTEXTS; the prompt's content words where no subject is found."""
    out = []
    for f in facts:
        loc = subject_last_token(enc, f)
        if loc is None:
            ids, positions = content_positions(enc, f)
            out.append([(ids, p) for p in positions])
            continue
        ids, first, last = loc
        subject = enc.decode(ids[first:last + 1]).strip()
        places = [(ids, last)]
        for c in CONTEXTS:
            cid = enc.tok(c.format(s=subject)).input_ids
            places.append((cid, len(cid) - 1))
        out.append(places)
    return out


@torch.no_grad()
def subject_keys(model: Transformer, settings: lora.LoraSettings, where: list[list[tuple[list[int], int]]],
                 pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Per projection `settings` adapts: its input at each fact's key positions, averaged [n_facts, in], on the
    frozen model."""
    flat_where = [(ids, p) for places in where for ids, p in places]
    owner = torch.tensor([i for i, places in enumerate(where) for _ in places], device=model.device)
    keys = {n: [] for n in lora.frozen_linears(model, settings)}
    T = max(len(ids) for ids, _ in flat_where)
    rows = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in flat_where], device=model.device)
    flat = torch.tensor([r * T + p for r, (_, p) in enumerate(flat_where)], device=model.device)
    with lora.reading_inputs(model, settings, lambda name, x: keys[name].append(x[flat].float())) as end:
        pos = torch.arange(T, device=model.device).expand(len(flat_where), T)
        model.run_layers(model.embed(rows), pos, AttnMask(), end=end)
    out = {}
    counts = torch.bincount(owner, minlength=len(where)).float()[:, None]
    for n, v in keys.items():
        x = torch.cat(v)
        out[n] = torch.zeros(len(where), x.shape[1], device=x.device).index_add_(0, owner, x) / counts
    return out


@torch.no_grad()
def set_keyed(model: Transformer, keys: dict[str, torch.Tensor], preserved: Preserved, ridge: float = 1e-2,
              overlap: float = 1e-2) -> None:
    """A = (Kᵀ C⁻¹ K + μI)⁻¹ Kᵀ C⁻¹ on every adapted linear, frozen; B zero and trained. `ridge` regularises C
    (relative to its mean eigenvalue); μ = `overlap` × the mean eigenvalue of Kᵀ C⁻¹ K keeps A bounded when two
    facts share a subject: their keys nearly coincide (whitened cosine 0.997 on facts-dev), and exact A K = I
    would need rows hundreds of times larger that fire on everything; with μ both rows read the shared subject
    at about half strength and distinct keys still get A K ≈ I."""
    for name, m in lora.adapters_of(model).items():
        C = preserved.moments[name].double()
        d = C.shape[0]
        C = C + ridge * (torch.trace(C) / d) * torch.eye(d, dtype=C.dtype, device=C.device)
        K = keys[name].double().t()  # [d, n]
        CiK = torch.linalg.solve(C, K)  # C⁻¹ K
        G = K.t() @ CiK  # Kᵀ C⁻¹ K [n, n]
        n = G.shape[0]
        G = G + max(overlap, 1e-9) * torch.trace(G) / n * torch.eye(n, dtype=G.dtype, device=G.device)
        A = torch.linalg.solve(G, CiK.t())  # [n, d]
        if A.shape[0] != m.lora_A.shape[0]:
            raise ValueError(f"{name}: rank {m.lora_A.shape[0]} for {A.shape[0]} keys")
        m.lora_A.copy_(A.float())
        m.lora_A.requires_grad_(False)
        m.lora_B.zero_()
