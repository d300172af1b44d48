"""Preserved inputs: the second moments of the adapted projections' inputs on text that must not move.

Forgetting many facts at once with NPO teaches plain LoRA a shortcut — "after a factual question, say anything
but a fact" — and every neighbour goes with the forgotten answers. Run the frozen model once over preserved
text (same-template prompts with other subjects, the package's preservation text) and keep, for each adapted
linear, C = E[x xᵀ] of its inputs. Keyed adapters (lune_fast.keyed) are whitened against C — that is what
keeps the neighbours. C also gives a penalty for any adapter (`--preserve-weight λ`, the soft form of
AlphaEdit's null-space projection):

    λ · mean over adapted linears of  E‖ΔW x‖² / E‖W x‖²  =  tr(ΔW C ΔWᵀ) / tr(W C Wᵀ),   ΔW = s·B A

— the relative change of that projection's output on the preserved inputs, a few r×d×d products a step however
much text went into C. On plain LoRA it only trades forgetting for locality along the old curve (RESULTS.md
section 2, "soft key preservation" rows); it stays an option.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora, progress
from .data import make_batch
from .model import Transformer
from .settings import SettingsError


@dataclass
class Preserved:
    """Per adapted linear (PEFT module path): the input second moment C [in, in] and tr(W C Wᵀ)."""
    moments: dict[str, torch.Tensor]
    energy: dict[str, float]
    tokens: int

    def penalty(self, model: Transformer) -> torch.Tensor:
        """The mean relative output change of the adapted linears on the preserved inputs (differentiable in
        the adapters)."""
        terms = []
        for name, m in lora.adapters_of(model).items():
            C = self.moments[name]
            A, B = m.lora_A, m.lora_B
            ACA = A @ C @ A.t()  # [r, r]
            terms.append((m.scale ** 2) * ((B @ ACA) * B).sum() / self.energy[name])
        return torch.stack(terms).mean()


CHUNK = 64  # sequences a forward reads; sums are added chunk by chunk, in order


@dataclass
class Sums:
    """Running sums of x xᵀ per adapted linear over `seqs` (the chunks read, a forward each, or the (chunk, index)
    pairs taken out again), and their token count."""
    seqs: list
    sums: dict[str, torch.Tensor]
    n: int

    def copy(self) -> "Sums":
        return Sums(self.seqs, {k: v.clone() for k, v in self.sums.items()}, self.n)


@torch.no_grad()
def _add_chunks(model: Transformer, settings: lora.LoraSettings, chunks: list[list[list[int]]], acc: Sums,
                pad_id: int, pack: int, take: list[int] | None = None) -> None:
    """Add the inputs of each chunk of sequences (non-empty; one forward each) to `acc`; with `take`, only those
    of the take[i]-th sequence of chunk i (a sequence taken out again, read in the forward it was added in: the
    same inputs, bit for bit)."""
    valid = {}

    def read(name, x):
        x = x[valid["idx"]]
        x = x.float()  # float32 products: A = (KᵀC⁻¹K)⁻¹KᵀC⁻¹ amplifies any rounding of C
        s = acc.sums.get(name)
        if s is None:  # the first product is the sum: no zero matrix to fill and add to
            acc.sums[name] = x.t() @ x
        else:  # in place: no d × d product to allocate and add
            s.addmm_(x.t(), x)

    with lora.reading_inputs(model, settings, read) as end, \
            progress.bar(len(chunks), "preserved-input moments", "chunk", least=8) as shown:
        for i, chunk in enumerate(chunks):
            shown.update()
            # (ids, [pad]) makes the packed input row exactly ids
            batch = make_batch([(s, [pad_id]) for s in chunk], pad_id, pack=pack).to(model.device)
            segments = batch.segments.reshape(-1)
            valid["idx"] = ((segments >= 0) if take is None else (segments == take[i])).nonzero().squeeze(1)
            acc.n += int(valid["idx"].numel())
            positions, mask = batch.layout()
            model.run_layers(model.embed(batch.input_ids), positions, mask, end=end)
    acc.seqs = acc.seqs + (chunks if take is None else list(zip(chunks, take)))


def group_moments(model: Transformer, settings: lora.LoraSettings, seqs: list[list[int]], pad_id: int = 0,
                  pack: int = 256, cache: dict | None = None, key=None, stable: int = 0,
                  minus: list[int] = (), minus_stable: int = 0, files: "SumsFiles | None" = None,
                  chunk: int | None = None, provisional: int | None = None, minus_provisional: int | None = None,
                  sizes: list[int] | None = None, mean: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """E[x xᵀ] over every token of `seqs` of the inputs of each projection `settings` adapts, on the frozen
    model (packed rows, one forward per chunk: `sizes` sequences each, else `chunk` (CHUNK); only the layers up
    to the last adapted one run), and the token count; with mean=False the sums Σ x xᵀ instead (for combine,
    which scales them as it adds them; they may be kept sums: not to be changed).

    With `cache` (a dict this function owns: it keeps the entries of one `key`): the first `stable` sequences are
    ones the next call will start with too (a lifelong state's earlier neighbours), and the first `provisional`
    (>= stable; default: stable) ones it may start with (with this request's neighbours, should it land). The sums
    over the whole chunks of both prefixes are kept under `key`, and a call with that key whose chunks start
    with a kept prefix adds only the rest — the same chunks in the same order, so the result is the one computed
    afresh, bit for bit. With `files` the stable prefix's sums are kept on disk too, for the next process.

    `minus`: positions in `seqs` of sequences taken out again, so that a sequence leaving the set need not change
    the others' chunks: each is read again in its own chunk's forward (its inputs exactly those added; read in
    another batch, bf16 inputs round otherwise, and the subtraction left the moments indefinite: an eigenvalue
    -1.7x the mean on an AMX Xeon) and subtracted; kept as above with `minus_stable` and `minus_provisional`."""
    if cache is not None:
        for k in [k for k in cache if k not in (key, ("minus", key))]:
            del cache[k]
    chunk = chunk or CHUNK
    if sizes is None and not minus:
        seqs = [s for s in seqs if s]
    stride = sizes is None  # chunks of `chunk`: a shorter last one may grow in the next call
    sizes = [min(chunk, len(seqs) - i) for i in range(0, len(seqs), chunk)] if stride else list(sizes)
    if sum(sizes) != len(seqs) or min(sizes, default=1) < 1:
        raise ValueError(f"chunk sizes {sizes} do not split {len(seqs)} sequences")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = [seqs[a:a + n] for a, n in zip(starts, sizes)]
    owner = [i for i, n in enumerate(sizes) for _ in range(n)]

    def whole(count: int | None) -> int | None:  # the chunks the first `count` sequences hold for good
        if count is None:
            return None
        return count // chunk if stride else sum(1 for a, n in zip(starts, sizes) if a + n <= count)

    taken = [(chunks[owner[p]], p - starts[owner[p]]) for p in minus]
    acc = _kept_sums(model, settings, chunks, pad_id, pack, cache, key, whole(stable), whole(provisional), files,
                     "listed")
    sums, n = acc.sums, acc.n
    if taken:
        out = _kept_sums(model, settings, taken, pad_id, pack, cache, ("minus", key), minus_stable,
                         minus_provisional, files, "minus")
        sums, n = {k: v - out.sums[k] for k, v in sums.items()}, n - out.n
    elif cache is not None:  # nothing taken out: no sums to keep for it either
        cache[("minus", key)] = []
    return ({k: v / max(n, 1) for k, v in sums.items()} if mean else sums), n


def _add_items(model, settings, items: list, acc: Sums, pad_id: int, pack: int, kind: str) -> None:
    if kind == "minus":
        _add_chunks(model, settings, [c for c, _ in items], acc, pad_id, pack, take=[t for _, t in items])
    else:
        _add_chunks(model, settings, items, acc, pad_id, pack)


def _kept_sums(model: Transformer, settings: lora.LoraSettings, items: list, pad_id: int, pack: int,
               cache: dict | None, key, stable: int, provisional: int | None, files: "SumsFiles | None",
               kind: str) -> Sums:
    """Sums over `items` (chunks, or (chunk, index) to take out), starting from the longest kept prefix."""
    provisional = max(stable, provisional if provisional is not None else stable)
    linears = lora.frozen_linears(model, settings)
    fits = [k for k in (cache.get(key, ()) if cache is not None else ())
            if len(k.seqs) <= provisional and items[:len(k.seqs)] == k.seqs and set(k.sums) == set(linears)]
    kept = max(fits, key=lambda k: len(k.seqs), default=None)
    if kept is None and files is not None and cache is not None:
        kept = files.load(kind, items[:stable], model.device)
        kept = kept if kept is not None and set(kept.sums) == set(linears) else None
    if kept is not None and len(kept.seqs) == len(items):
        acc = kept  # nothing to add: the kept sums as they are (no caller changes them)
    else:  # sums are added in place: a kept entry is copied first
        acc = kept.copy() if kept is not None else Sums([], {}, 0)
    if cache is not None:
        entries = {len(k.seqs): k for k in fits + ([kept] if kept is not None else [])}  # never changed
        ends = sorted({stable, provisional})
        for n in ends:
            if n > len(acc.seqs):
                _add_items(model, settings, items[len(acc.seqs):n], acc, pad_id, pack, kind)
                # never changed after (the file may be written later): the last addition needs no copy
                entries[n] = acc.copy() if n < len(items) else acc
                if files is not None and n <= stable:
                    files.save(kind, entries[n])
        # the sums the next call starts with: the stable prefix's, or with this request's part should it land
        cache[key] = [entries[n] for n in ends if n in entries]
    if len(items) > len(acc.seqs):
        _add_items(model, settings, items[len(acc.seqs):], acc, pad_id, pack, kind)
    for n, m in linears.items():
        if n not in acc.sums:  # nothing read (no items): zero sums
            acc.sums[n] = torch.zeros(m.in_features, m.in_features, device=model.device)
    return acc


# Moments over a long text take tens of seconds (the replace default's 60,000 tokens: ~45 s on 2 cores); they are
# kept on disk, keyed by everything they are computed from, so that only a machine's first request pays.
# Part of every store file's name: raised when what a file holds changes (2: chunks and probes, SumsFiles; 3: a
# chunk's products added in place, which rounds otherwise)
MOMENTS_FORMAT = 3


MOMENTS_STORE_MB = 1024  # ~15 layer windows of the default model (66 MB each)


def moments_store() -> Path | None:
    """Where text moments are kept: LUNE_FAST_MOMENTS, else the cache's moments/ folder; LUNE_FAST_MOMENTS=""
    keeps none. LUNE_FAST_MOMENTS_MB bounds its size (MOMENTS_STORE_MB by default)."""
    from .weights import cache_dir

    where = os.environ.get("LUNE_FAST_MOMENTS")
    if where == "":
        return None
    return Path(where) if where else cache_dir() / "moments"


def _store_path(store: Path, origin: str, what: tuple) -> Path:
    """A store file's name: everything its tensors are computed from (the CPU kind too: float rounding)."""
    name = hashlib.sha256(repr((MOMENTS_FORMAT, torch.__version__, torch.backends.cpu.get_cpu_capability(),
                                origin, what)).encode()).hexdigest()[:32]
    return store / f"{name}.safetensors"


def _keep_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a store file atomically (a concurrent writer leaves one whole file) and prune the store; a read-only
    or full disk only means nothing is kept."""
    from safetensors.torch import save_file

    from .io import atomic_output_file

    try:
        limit = store_limit()
        with atomic_output_file(path) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        prune_store(path.parent, path, limit)
    except OSError:
        pass


def stored_moments(origin: str, what: tuple, compute, device) -> tuple[dict[str, torch.Tensor], int]:
    """compute() -> group_moments' (moments, tokens), read from moments_store() where a run with the same
    `origin` (the model's weight files, dtype, device, the CPU kind), torch and `what` (layout, text content)
    kept them, else computed and kept there. The store keeps the most recently used files within its size
    bound."""
    from safetensors.torch import load_file

    store = moments_store()
    if store is None:
        return compute()
    store_limit()  # a bad bound is said before any work
    path = _store_path(store, origin, what)
    if path.is_file():
        try:
            tensors = load_file(str(path), device=str(device))
            n = int(tensors.pop("__tokens__").item())
            _touch(path)
            return tensors, n
        except Exception:  # a damaged file is computed again and replaced
            pass
    moments, n = compute()
    _keep_file(path, {**moments, "__tokens__": torch.tensor(n)})
    return moments, n


# A kept sum is subtracted from later, so a file may serve only a forward that rounds as the one that wrote it:
# its name holds what a fixed probe gives the adapted projections, read alone and in a batch (the code, torch's
# kernels, the CPU and its threads all show there), read once per model, layout and weights.
# (lengths of random token sequences: enough rows that a change of a row's rounding in 1% of rows shows, and a
# short one read alone, one batch row of 8: a chunk that short would take a few-rows product, were
# kernels/frozen_linear.py's FEW_ROWS raised to 8)
PROBE = (64, 32, 48, 7)


@torch.no_grad()
def forward_digest(model: Transformer, settings: lora.LoraSettings, pad_id: int = 0) -> str:
    """A digest of the adapted projections' inputs on PROBE (the first sequence alone, the next three in one
    batch, the last alone)."""
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    key = (settings.targets, settings.layers, pad_id, weights)
    kept = vars(model).get("_lune_probe")
    if kept is not None and kept[0] == key:
        return kept[1]
    g = torch.Generator().manual_seed(0)
    probe = [torch.randint(model.config.vocab_size, (n,), generator=g).tolist() for n in PROBE]
    h = hashlib.sha256()
    mix = {}

    def read(name, x):
        if name not in mix:
            mix[name] = torch.randn(x.shape[-1], generator=g, dtype=torch.float64).to(x.device)
        h.update(f"{name}:{float((x.double() @ mix[name]).sum())!r};".encode())

    with lora.reading_inputs(model, settings, read) as end:
        for chunk in (probe[:1], probe[:3], probe[3:]):
            batch = make_batch([(s, [pad_id]) for s in chunk], pad_id, pack=256).to(model.device)
            positions, mask = batch.layout()
            model.run_layers(model.embed(batch.input_ids), positions, mask, end=end)
    vars(model)["_lune_probe"] = (key, h.hexdigest())
    return h.hexdigest()


def _seqs_digest(seqs: list[list[int]]) -> str:
    return hashlib.sha256(repr(seqs).encode()).hexdigest()


# A process writes kept sums to the store at once the first time, then when SAVE_EVERY more chunks were added
# since it last wrote them, and the rest when it exits: a write is 66 MB a kind for the default window (0.11-0.16 s
# of a 1.9 s one-fact request into a 100-fact state, AMX Xeon, 2 cores), and only a fresh process reads it. A
# process that dies unflushed costs the next one at most SAVE_EVERY chunks read again.
SAVE_EVERY = 16  # chunks (a fact's neighbours each, in a state)
KEY_SEQS = 1  # a file is named by its prefix's first chunk (a state's first fact's neighbours)
_unwritten: dict[Path, Sums] = {}
_written: dict[Path, int] = {}
_files_lock = threading.Lock()


def _write_kept(path: Path, acc: Sums) -> None:
    _keep_file(path, acc.sums, {"count": str(len(acc.seqs)), "digest": _seqs_digest(acc.seqs),
                                "tokens": str(acc.n)})
    _written[path] = len(acc.seqs)


@atexit.register
def flush_kept_sums() -> None:
    """Write the kept sums this process has not written yet (at exit; tests call it), into stores that still
    exist (a removed one, a test's temporary folder, is not made again)."""
    with _files_lock:
        while _unwritten:
            path, acc = _unwritten.popitem()
            if path.parent.is_dir():
                _write_kept(path, acc)


class SumsFiles:
    """group_moments' kept sums on disk as well (moments_store()), so that a fresh process per request (the
    CLI's `unlearn --into`) does not read every earlier neighbour again. A file per `origin`, `what` (layout, what
    is folded into the weights, and how the forward rounds: forward_digest), kind and first KEY_SEQS chunks holds
    the sums over a prefix of chunks (or of sequences taken out), with that prefix's length and digest; it is used
    only where the chunks start with exactly that prefix. `what` may be a function giving it, called once if at
    all (a folded state's digest takes a while)."""

    def __init__(self, origin: str, what):
        self.origin, self._what = origin, what

    def _path(self, kind: str, seqs: list) -> Path | None:
        store = moments_store()
        if store is None or len(seqs) < KEY_SEQS:
            return None
        if callable(self._what):
            self._what = self._what()
        return _store_path(store, self.origin, (self._what, kind, "chunks", _seqs_digest(seqs[:KEY_SEQS])))

    def load(self, kind: str, seqs: list, device) -> Sums | None:
        """The kept sums over a prefix of `seqs` (the chunks every later call starts with), or None."""
        from safetensors import safe_open

        path = self._path(kind, seqs)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                count = int(meta["count"])
                if count > len(seqs) or meta["digest"] != _seqs_digest(seqs[:count]):
                    return None
                sums = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # damaged: computed again (and the file replaced)
            return None
        _touch(path)
        return Sums(seqs[:count], sums, int(meta["tokens"]))

    def save(self, kind: str, acc: Sums) -> None:
        """Keep `acc` (which must not change after) for the next process: now, or by SAVE_EVERY, or at exit."""
        path = self._path(kind, acc.seqs)
        if path is None:
            return
        with _files_lock:
            if path in _written and len(acc.seqs) - _written[path] < SAVE_EVERY:
                _unwritten[path] = acc
                return
            _unwritten.pop(path, None)
            _write_kept(path, acc)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only store is still read
        pass


def store_limit() -> float:
    """The moments store's bound in bytes (LUNE_FAST_MOMENTS_MB)."""
    given = os.environ.get("LUNE_FAST_MOMENTS_MB")
    try:
        return float(given or MOMENTS_STORE_MB) * 2**20
    except ValueError:
        raise SettingsError(f"LUNE_FAST_MOMENTS_MB={given!r}: expected a number of megabytes") from None


def prune_store(store: Path, keep: Path, limit: float) -> None:
    """Remove the least recently used moment files past `limit` bytes (never `keep`, the one just written): the
    store is a cache, each layout and text adding tens of MB."""
    files = []
    for f in store.glob("*.safetensors"):
        try:
            st = f.stat()
        except OSError:  # removed by another process meanwhile
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = 0
    for _, size, f in sorted(files, key=lambda t: t[0], reverse=True):
        total += size
        if total > limit and f != keep:
            f.unlink(missing_ok=True)


def combine(model: Transformer, settings: lora.LoraSettings, groups: list[tuple[dict[str, torch.Tensor], int]],
            summed: int = 0, own_first: bool = False) -> Preserved:
    """The groups' moments averaged, each group weighing the same whatever its token count (a few sentences of
    text are not drowned by hundreds of prompts), with each projection's output energy tr(W C Wᵀ). The first
    `summed` groups hold sums over their tokens (group_moments with mean=False), the others moments.
    `own_first`: the first group's matrices are the caller's to overwrite (the sum is formed in them)."""
    kept = [(g, i < summed) for i, g in enumerate(groups) if g[1] > 0]
    own_first = own_first and bool(kept) and kept[0][0] is groups[0]
    groups = [g for g, _ in kept]
    weights = [1 / (len(kept) * (g[1] if is_sum else 1)) for g, is_sum in kept]
    linears = lora.frozen_linears(model, settings)
    moments, energy = {}, {}
    for name, m in linears.items():
        first = groups[0][0][name]  # the other groups are added into it, or into a new matrix
        c = first.mul_(weights[0]) if own_first else first * weights[0]
        for g, w in zip(groups[1:], weights[1:]):
            c.add_(g[0][name], alpha=w)
        moments[name] = c
        energy[name] = float(torch.dot(c.reshape(-1), gram(m.weight).reshape(-1)))
    return Preserved(moments, energy, sum(g[1] for g in groups))


@torch.no_grad()
def gram(w: torch.Tensor) -> torch.Tensor:
    """Wᵀ W in float32 [in, in], kept on the tensor until W changes: tr(W C Wᵀ) = Σ C ∘ WᵀW then costs an
    elementwise product a request instead of a d×d×out one (preserved inputs 0.24 → 0.19 s of a one-fact request
    on 2 cores; the float32 copy costs in² × 4 bytes a weight, 66 MB for the default window)."""
    keep = type(w.data) is torch.Tensor  # a sharded parameter is refilled in place: nothing kept
    key = (w.data_ptr(), w._version, tuple(w.shape)) if keep else None
    kept = getattr(w, "_lune_gram", None)
    if keep and kept is not None and kept[0] == key:
        return kept[1]
    wf = w.detach().float()
    g = wf.t() @ wf
    if keep:
        w._lune_gram = (key, g)
    return g
