"""Subject-keyed adapters: LoRA whose A reads only the forgotten facts' subjects (ROME/MEMIT's keys, as LoRA).

For an adapted down_proj at layer l, the key of fact i is the projection's input at the last token of the
fact's subject (found as for causal tracing), k_i [d]. With K = [k_1 .. k_n] and C the second moment of the
projection's inputs over preserved text (lune_fast.preserve), A is fixed to

    A = (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹        so that  A K = I  with the least  tr(A C Aᵀ)

(up to a small ridge, see set_keyed): the rows that answer 1 to their own subject and as little as possible to
everything the preserved text puts into that projection. Only B trains: column i is what the layer writes when
it reads subject i, the value of a rank-one edit. The adapter is still a plain LoRA (rank = number of facts),
loadable by PEFT.

Facts about one subject share a rank (subject_groups): the first one's row of A reads their common key (averaged
over all their prompts), the others' rows are zero, and every one of them trains that column of B. Two rows for
one subject would have to tell nearly identical keys apart, which takes rows large enough to read everything.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from . import lora
from .lora import AdapterError
from .assets import asset
from .data import Encoder, Fact, listed_neighbors, make_batch, read_lines
from .model import Transformer
from .preserve import CHUNK, Preserved, SumsFiles, combine, forward_digest, group_moments, stored_moments
from .subjects import content_positions, other_subject_prompts, subject_last_token, subject_text


# Contexts the subject is also read in: a key averaged over them answers to the subject however it is asked
# about (ROME averages over random prefixes for the same reason).
CONTEXTS = ("{s}", "I was reading about {s}", "Tell me about {s}", "Here is a note on {s}",
            "We talked about {s}", "Q: What do you know about {s}", "The topic is {s}")


def subject_groups(enc: Encoder, facts: list[Fact]) -> list[int]:
    """Per fact, the index of the first fact about the same subject (its rank; itself when it is the first, or
    when no subject is found). Subjects compare as their words, without case, punctuation or a leading "the"."""
    first: dict[str, int] = {}
    out = []
    for i, f in enumerate(facts):
        words = re.findall(r"\w+", (subject_text(enc, f) or "").lower())
        words = " ".join(words[1:] if words[:1] == ["the"] else words)
        out.append(first.setdefault(words, i) if words else i)
    return out


def key_positions(enc: Encoder, facts: list[Fact], groups: list[int] | None = None
                  ) -> list[list[tuple[list[int], int]]]:
    """Per fact, the (token ids, key position) pairs its key is averaged over: the prompt at its subject's last
    token and the subject in each of CONTEXTS; the prompt's content words where no subject is found. With
    `groups` (subject_groups), facts of one group share all their group's pairs, so their keys are equal."""
    out = []
    for f in facts:
        loc = subject_last_token(enc, f)
        if loc is None:
            ids, positions = content_positions(enc, f)
            out.append([(ids, p) for p in positions])
            continue
        ids, _, last = loc
        subject = subject_text(enc, f)
        places = [(ids, last)]
        for c in CONTEXTS:
            cid = enc.tok(c.format(s=subject)).input_ids
            places.append((cid, len(cid) - 1))
        out.append(places)
    if groups is None:
        return out
    merged: dict[int, list[tuple[list[int], int]]] = {}
    for g, places in zip(groups, out):
        have = merged.setdefault(g, [])
        have += [p for p in places if p not in have]
    return [merged[g] for g in groups]


@torch.no_grad()
def subject_keys(model: Transformer, settings: lora.LoraSettings, where: list[list[tuple[list[int], int]]],
                 pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Per projection `settings` adapts: its input at each fact's key positions, averaged [n_facts, in], on the
    frozen model."""
    flat_where = [(ids, p) for places in where for ids, p in places]
    owner = torch.tensor([i for i, places in enumerate(where) for _ in places], device=model.device)
    keys = {n: [] for n in lora.frozen_linears(model, settings)}
    # (ids, [pad]) makes the input row exactly ids, right-padded
    batch = make_batch([(ids, [pad_id]) for ids, _ in flat_where], pad_id).to(model.device)
    T = batch.input_ids.shape[1]
    flat = torch.tensor([r * T + p for r, (_, p) in enumerate(flat_where)], device=model.device)
    with lora.reading_inputs(model, settings, lambda name, x: keys[name].append(x[flat].float())) as end:
        positions, mask = batch.layout()
        model.run_layers(model.embed(batch.input_ids), positions, mask, end=end)
    out = {}
    counts = torch.bincount(owner, minlength=len(where)).float()[:, None]
    for n, v in keys.items():
        x = torch.cat(v)
        out[n] = torch.zeros(len(where), x.shape[1], device=x.device).index_add_(0, owner, x) / counts
    return out


# torch.linalg.cholesky_ex zeroes the factor's upper triangle in LAPACK's column-major layout, which its tril
# runs ~30x slower than on a row-major matrix: at d = 1536 in float64, 31 of its 40 ms (AMX Xeon, 2 cores).
# Factoring by blocks of CHOLESKY_BLOCK rows (LAPACK on each diagonal block, then a triangular solve and a
# product for the rest) takes 16 ms for the same factor (to 3e-16).
CHOLESKY_BLOCK = 384


def cholesky_lower(M: torch.Tensor, block: int = CHOLESKY_BLOCK, ridge: float = 0.0) -> tuple[torch.Tensor, int]:
    """The lower Cholesky factor of a symmetric M + ridge·I by blocks (right-looking), and 0, or (partial, k)
    when it is not positive definite: k is the order of the first leading minor that is not, as LAPACK reports
    it."""
    A = M.clone()
    if ridge:
        A.diagonal().add_(ridge)
    n = A.shape[0]
    for s in range(0, n, block):
        e = min(n, s + block)
        Ld, info = torch.linalg.cholesky_ex(A[s:e, s:e])
        if int(info):
            return A, s + int(info)
        A[s:e, s:e] = Ld
        if e < n:
            P = torch.linalg.solve_triangular(Ld, A[e:, s:e].t(), upper=False).t()  # A21 L11⁻ᵀ
            A[e:, s:e] = P
            A[e:, e:].addmm_(P, P.t(), alpha=-1)
    return A.tril_(), 0


def spd_factor(M: torch.Tensor, what: str = "matrix", single: bool = False, ridge: float = 0.0) -> torch.Tensor:
    """The lower Cholesky factor of M + ridge·I, symmetric positive definite (the ridges make C and G so), by
    blocks (cholesky_lower): in float64, or with `single` in float32 where that succeeds. A matrix that is not
    (moments gone indefinite: a bug) is an AdapterError naming `what`, raised before anything is written."""
    if single:
        L, info = cholesky_lower(M.float(), ridge=ridge)
    if not single or info:  # float32 rounding can eat a small ridge: float64 decides
        L, info = cholesky_lower(M.double(), ridge=ridge)
    if info:
        raise AdapterError(f"{what}: the keyed solve's {M.shape[0]}x{M.shape[0]} matrix is not positive definite "
                           f"(leading minor {int(info)}); the preserved inputs' moments went indefinite, which is "
                           f"a bug in lune_fast: nothing was written; please report it with the request")
    return L


def spd_solve(M: torch.Tensor, B: torch.Tensor, what: str = "matrix") -> torch.Tensor:
    """M⁻¹ B for a symmetric positive definite M: a Cholesky factor (spd_factor) and two triangular solves, a
    third of the time of torch.linalg.solve's LU on 2 cores at d = 1536 (and torch.cholesky_solve is slower than
    either there)."""
    L = spd_factor(M, what)
    return torch.linalg.solve_triangular(L.t(), torch.linalg.solve_triangular(L, B, upper=False), upper=True)


@torch.no_grad()
def set_keyed(model: Transformer, keys: dict[str, torch.Tensor], preserved: Preserved, ridge: float = 1e-2,
              overlap: float = 1e-2, earlier: dict[str, torch.Tensor] | None = None,
              groups: list[int] | None = None) -> None:
    """A = (Kᵀ C⁻¹ K + μI)⁻¹ Kᵀ C⁻¹ on every adapted linear, frozen; B zero and trained. `ridge` regularises C
    (relative to its mean eigenvalue); μ = `overlap` × the mean eigenvalue of Kᵀ C⁻¹ K keeps A bounded when two
    keys nearly coincide (facts about one subject named differently; named alike, they share a row: `groups`):
    exact A K = I would need rows far larger than the others that fire on everything; with μ both rows read the
    shared subject at about half strength and distinct keys still get A K ≈ I (RESULTS.md section 2, "The key
    overlap ridge").

    `earlier`: the keys of a lifelong state's earlier requests [m, in] per linear (lune_fast.state). A is then
    the new facts' rows of the joint solve over [K, K_earlier] with targets [I, 0]: the new ranks answer
    (about) 0 to every earlier subject, AlphaEdit's null-space condition, so that they cannot undo or disturb
    what the earlier requests did.

    `groups` (subject_groups): only each group's first fact gets a row; the others' rows are zero (their
    columns of B never act, and their sequences train the first one's column)."""
    for name, m in lora.adapters_of(model).items():
        C = preserved.moments[name]
        d = C.shape[0]
        ridge_c = ridge * float(C.diagonal().double().sum()) / d  # relative to C's mean eigenvalue
        rows = sorted(set(groups)) if groups is not None else list(range(keys[name].shape[0]))
        K = keys[name][rows].double().t()  # [d, n]
        n_new = K.shape[1]
        if earlier is not None and name in earlier and len(earlier[name]):
            K = torch.cat([K, earlier[name].to(K.device, K.dtype).t()], dim=1)
        # C = L Lᵀ and its triangular solves in float32: the factor's rounding is that of C's own float32 sums,
        # and on the default model's moments (condition up to 1.4e5) A is within 2e-5 (relative) of an all-float64
        # solve, A K as near I, at 12.5 ms a layer instead of 26 (2 cores)
        L = spd_factor(C, f"{name} (preserved inputs)", single=True, ridge=ridge_c)
        Y = torch.linalg.solve_triangular(L, K.to(L.dtype), upper=False)  # L⁻¹ K
        Yd = Y.double()
        G = Yd.t() @ Yd  # Kᵀ C⁻¹ K [n, n]
        n = G.shape[0]
        G.diagonal().add_(max(overlap, 1e-9) * torch.trace(G) / n)
        if keys[name].shape[0] != m.lora_A.shape[0]:
            raise ValueError(f"{name}: rank {m.lora_A.shape[0]} for {keys[name].shape[0]} keys")
        # only the new rows of A = G⁻¹ Yᵀ L⁻¹: (L⁻ᵀ Y G⁻¹ E)ᵀ with E the new rows' columns of I, one triangular
        # solve of n_new columns where C⁻¹ K took two of all n (a state's earlier keys too)
        S = spd_solve(G, torch.eye(n, n_new, dtype=G.dtype, device=G.device), f"{name} (keys)")
        m.lora_A.zero_()
        m.lora_A[rows] = torch.linalg.solve_triangular(L.t(), Y @ S.to(L.dtype), upper=True).t().to(m.lora_A)
        m.lora_A.requires_grad_(False)
        m.lora_B.zero_()


# The preservation texts the package ships (Settings.preserve_text names them; a path is a user's file): the
# default model's own continuations of tools/preserve_seeds.txt — one greedy each (~3,200 tokens), and with 15
# sampled ones each (~60,000 tokens), replace mode's default: a 1,536-wide moment estimated from 3,200 tokens
# misjudges its small directions, which the whitened rows lean on, and a replacement writes far more than a
# suppression (RESULTS.md section 11, "A longer preservation text")
PACKAGE_TEXTS = ("preserve_text.jsonl", "preserve_text_long.jsonl")


def preserve_text_path(text: str | None) -> Path:
    """The file a Settings.preserve_text names: None the package's short text, a PACKAGE_TEXTS name the
    package's (unless a file of that name is here), else the path."""
    if text is None or (text in PACKAGE_TEXTS and not Path(text).is_file()):
        return asset(text or PACKAGE_TEXTS[0])
    return Path(text)


def listed_inputs(enc: Encoder, facts: list[Fact], earlier: list[Fact] | tuple, lifelong: bool = False
                  ) -> tuple[list[list[int]], list[int], int, list[int], int]:
    """The listed neighbours' prompts as preserved inputs: (each fact's neighbours that were no forget prompt
    when it came — the `earlier` facts', then with `lifelong` the request's `facts`', else the request's that
    are no forget prompt now; the chunks they are read in, one fact's each; how many of them the earlier facts
    list; the positions of those that became forget prompts later, to be taken out again; how many of those
    the earlier facts make).

    A state's next request starts with the same chunks — the earlier facts' if this request fails, all of them
    if it lands — so their sums are kept (group_moments' stable and provisional prefixes) and each fact's are
    read once, in one forward. A neighbour forgotten later (facts of one relation list each other) is taken out
    by subtraction (read again in its chunk's forward), so that no kept chunk changes. Those taken out go in
    the order of when they became forget prompts (the fact's place in the state), so that they too only grow at
    their end."""
    first = {}
    for i, f in enumerate([*earlier, *facts]):
        first.setdefault(f.prompt, i)
    listing = [*earlier, *facts] if lifelong else earlier
    mine, sizes = [], []
    for j, f in enumerate(listing):
        chunk = [(j, p, f.chat) for p, _ in f.neighbors if first.get(p, j + 1) > j]
        mine += chunk
        sizes += [len(chunk)] if chunk else []
    ids = [enc.prompt_ids(p, chat) for _, p, chat in mine]
    out = sorted((first[p], pos) for pos, (_, p, _) in enumerate(mine) if p in first)
    rest = [] if lifelong else [enc.prompt_ids(p, f.chat) for f, p, _ in listed_neighbors(facts, earlier)]
    sizes += [min(CHUNK, len(rest) - i) for i in range(0, len(rest), CHUNK)]
    n_earlier = sum(1 for j, _, _ in mine if j < len(earlier))
    return ids + rest, sizes, n_earlier, [pos for _, pos in out], sum(1 for when, _ in out if when < len(earlier))


# text moments a process keeps (layouts, texts, windows folded): a state whose other window changes between
# requests (one that has room again after a revoke) would otherwise keep every version
TEXTS_KEPT = 4


def preserved_inputs(model: Transformer, enc: Encoder, facts: list[Fact], settings: lora.LoraSettings,
                     n_prompts: int, text: str | None, seed: int, text_cache: dict, neighbors: bool = True,
                     earlier: list[Fact] | tuple = (), folded=None, origin: str | None = None,
                     lifelong: bool = False) -> Preserved:
    """The inputs the adapter should leave alone, in groups of equal weight: each fact's prompt template with
    `n_prompts` other subjects; the neighbours the records list (with `neighbors`: their prompts only, not their
    answers; the request says they must stay), also those of a lifelong state's `earlier` facts; and the
    preservation text (preserve_text_path). The text's moments depend only on the model, the adapter layout and
    what a lifelong state has `folded` into the frozen weights (State.folded_outside), so they are kept in
    `text_cache` under those and reused (the TEXTS_KEPT most recently used), as are the earlier neighbours'
    sums (group_moments; with `lifelong`, this request's too, for the state's next request); with `origin` (what
    the model was loaded from), both also on disk (preserve.stored_moments, preserve.SumsFiles; folded ranks by
    their digest)."""
    prompts = [enc.prompt_ids(p, f.chat) for f, ps in zip(facts, other_subject_prompts(facts, n_prompts, seed))
               for p in ps]
    groups = [group_moments(model, settings, prompts, enc.pad_id, mean=False)]  # sums: combine scales them
    fold = folded.key if folded is not None else None
    listed, sizes, stable, minus, minus_stable = listed_inputs(enc, facts, earlier, lifelong) if neighbors \
        else ([], [], 0, [], 0)
    if listed:
        files = None if origin is None else SumsFiles(origin, lambda: (
            settings.targets, settings.layers, folded.digest() if folded is not None else None,
            forward_digest(model, settings, enc.pad_id)))
        groups.append(group_moments(model, settings, listed, enc.pad_id,
                                    cache=text_cache.setdefault("earlier neighbours", {}),
                                    key=(settings.targets, settings.layers, fold), stable=stable, minus=minus,
                                    minus_stable=minus_stable, files=files, sizes=sizes,
                                    provisional=len(listed) if lifelong else stable,
                                    minus_provisional=len(minus) if lifelong else minus_stable, mean=False))
    key = (settings.targets, settings.layers, text, fold)
    if key in text_cache:
        text_cache[key] = text_cache.pop(key)  # the most recently used last
    else:
        path = preserve_text_path(text)
        lines = read_lines(path)

        def compute():
            ids = [enc.tok(t, add_special_tokens=False)["input_ids"] for t in lines]
            return group_moments(model, settings, ids, enc.pad_id)

        if origin is None:
            text_cache[key] = compute()
        else:
            what = (settings.targets, settings.layers, hashlib.sha256("\n".join(lines).encode()).hexdigest())
            if folded is not None:
                what += (folded.digest(),)
            text_cache[key] = stored_moments(origin, what, compute, model.device)
        kept = [k for k in text_cache if isinstance(k, tuple)]
        for old in kept[:-TEXTS_KEPT]:  # the least recently used (66 MB a layer window on the default model)
            del text_cache[old]
    return combine(model, settings, groups + [text_cache[key]], summed=len(groups), own_first=True)


# A keyed lr is a step on B measured for projections that write values of rms about 1, as the default model's first
# keyed layers do (0.97-0.99 over the preserved inputs). Where a model's adapted projections write values more than
# 1.5x smaller, the step is scaled by that ratio (Gemma 3 270M: 0.2, whose down_proj output then passes a norm: the
# unscaled step overshot the stop threshold and cost ×1.8 retain perplexity, RESULTS.md section 12). Larger values
# keep the step: the default model's layers 17-23 write rms 2.56, and there the scaled column step cost more than
# the measured one on facts-dev (replace, 50 at once: neighbours .897 against .954, retain ppl ×1.039 against
# ×1.023; suppress, 32: ppl ×1.037 against ×1.023, at paraphrases .125 against .25; RESULTS.md section 11, "The
# second window's step"). Inside the band the default stands as it is. An lr the request gives is used as given.
STEP_BAND = (2 / 3, 1.5)


def step_scale(model: Transformer, settings: lora.LoraSettings, preserved: Preserved) -> float:
    """The factor on a keyed lr for this model: the median rms of the adapted projections' outputs over the
    preserved inputs (tr(W C Wᵀ) / out_features) where it is under STEP_BAND, else 1."""
    linears = lora.frozen_linears(model, settings)
    rms = sorted((preserved.energy[n] / m.out_features) ** 0.5 for n, m in linears.items())
    median = (rms[(len(rms) - 1) // 2] + rms[len(rms) // 2]) / 2
    return median if median < STEP_BAND[0] else 1.0


def attach_keyed(model: Transformer, enc: Encoder, facts: list[Fact], settings: lora.LoraSettings,
                 preserved: Preserved, ridge: float, overlap: float, earlier: dict[str, torch.Tensor] | None = None,
                 groups: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Attach an adapter of rank len(facts) whose A reads the facts' subject keys (set_keyed, away from the
    `earlier` keys; `groups`: facts sharing a subject share a rank); only B trains. Returns the keys (a lifelong
    state keeps them for later requests)."""
    keys = subject_keys(model, settings, key_positions(enc, facts, groups), enc.pad_id)
    lora.attach(model, settings)
    set_keyed(model, keys, preserved, ridge, overlap, earlier, groups)
    return keys
