"""The model in another dtype, read from its safetensors files one layer at a time: what the recall rounds ask
when they check a bf16 run in float32 (Settings.check_dtypes).

A resident float32 copy of the model costs its float32 weights (+540 MB on the default model: a run's peak
×1.5, `lune-fast bench e2e`) and seconds to load. A StreamedTwin keeps only the files' header: each pass reads
one layer's tensors (plain file reads, nothing mapped), folds the source model's adapter into them, runs every
sequence through the layer and drops it; then the output head, a block of rows at a time, for the argmax. Its
peak is one layer's weights and one block of the head; a pass reads the files once (from the page cache after
the first) and does a prefill's arithmetic in the twin's dtype.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import os
from pathlib import Path

import torch

from . import lora
from .model import Transformer, positions_and_mask, rope_inv_freq
from .weights import FLOAT_DTYPES, SAFETENSORS_DTYPES

# rows of the output head read at a time for the argmax (49152 × 576 float32: 19 MB a block)
HEAD_BLOCK = 8192


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None. A pass allocates and frees a layer's activations 30 times over; glibc
    keeps what a large free leaves in its heap (its mmap threshold rises to the largest block freed), and
    without a trim a pass left ~200 MB more resident on the default model (32 answers)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim() -> None:
    if (trim := _malloc_trim()) is not None:
        trim(0)


class TensorFiles:
    """The tensors of safetensors files by name, read on demand with plain reads: only what is asked for is
    ever in memory, and none of it stays mapped."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__" and SAFETENSORS_DTYPES.get(meta["dtype"]) in FLOAT_DTYPES:
                    self.where[name] = (Path(f), SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                        8 + n + meta["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name][1]

    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Rows start:stop of tensor `name` (all of it by default), in the file's dtype; into `out` (contiguous,
        of that dtype and at least that size; the rows are its first ones) where given, so that a buffer
        serves pass after pass (a fresh one each time leaves the allocator holding memory it never returns)."""
        path, dtype, shape, _ = self.where[name]
        stop = shape[0] if stop is None else min(stop, shape[0])
        n = max(stop - start, 0)
        if out is None:
            out = torch.empty(n, *shape[1:], dtype=dtype)
        out = out.view(-1)[:n * math.prod(shape[1:])].view(n, *shape[1:])
        with open(path, "rb", buffering=0) as fh:
            self._fill(fh.fileno(), name, out, start)
        return out

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` (any shape) of a 2-D tensor, each distinct row read once (the file opened once)."""
        uniq, inverse = torch.unique(index, return_inverse=True)
        path, dtype, shape, _ = self.where[name]
        got = torch.empty(len(uniq), *shape[1:], dtype=dtype)
        with open(path, "rb", buffering=0) as fh:
            for k, i in enumerate(uniq.tolist()):
                self._fill(fh.fileno(), name, got[k], i)
        return got[inverse]

    def _fill(self, fd: int, name: str, out: torch.Tensor, start: int) -> None:
        """`out` (contiguous) from tensor `name`'s bytes at row `start` on, read through the open file `fd`."""
        path, dtype, shape, offset = self.where[name]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        at = offset + start * math.prod(shape[1:]) * dtype.itemsize
        while view:  # a read may return less than asked
            got = os.preadv(fd, [view], at)
            if got <= 0:
                raise OSError(f"{path}: {name} is cut short")
            view, at = view[got:], at + got


class StreamedTwin:
    """`source` (a Transformer, its adapter on) as it runs when loaded in `dtype` from `model_dir`'s files.
    The adapter is read from `source` at every pass (what trains there acts here at once), folded into each
    layer's freshly read weights: delta_weight() in float32, then cast."""

    def __init__(self, files: list[Path], dtype: torch.dtype, source: Transformer):
        self.files, self.dtype, self.source = TensorFiles(files), dtype, source
        cfg = source.config
        self.head = "lm_head.weight" if not cfg.tie_word_embeddings and "lm_head.weight" in self.files \
            else "model.embed_tokens.weight"
        # the skeleton: module code, shapes and config of the model, no memory (meta); a layer is materialized
        # while it runs
        self.net = Transformer(cfg, dtype=dtype, device="meta")
        self.net.inv_freq = rope_inv_freq(cfg)
        if cfg.local_rope_theta is not None:
            self.net.inv_freq_local = rope_inv_freq(cfg, local=True)
        # one layer's weights, and one block of the head, read into the same buffers layer after layer
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._load(self.net.norm, "model.norm.", "final")

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if (key, dtype) not in self._scratch or self._scratch[key, dtype].numel() < math.prod(shape):
            self._scratch[key, dtype] = torch.empty(math.prod(shape), dtype=dtype)
        return self._scratch[key, dtype][:math.prod(shape)].view(shape)

    def _read(self, key: str, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name` (rows start:stop) in the twin's dtype, in the scratch buffer `key`."""
        shape = self.files.where[name][2]
        rows = (shape[0] if stop is None else min(stop, shape[0])) - start
        raw = self.files.read(name, start, stop, out=self._buffer(key, (rows, *shape[1:]), self.files.dtype(name)))
        if raw.dtype == self.dtype:
            return raw
        return self._buffer(key + ":cast", raw.shape, self.dtype).copy_(raw)

    def _load(self, module: torch.nn.Module, prefix: str, key: str) -> None:
        """The module's parameters become views of the scratch buffers, read from the files."""
        self._set(module, lambda full, p: self._read(f"{key}:{full}", prefix + full))

    def _unload(self, module: torch.nn.Module) -> None:
        self._set(module, lambda full, p: torch.empty(p.shape, dtype=p.dtype, device="meta"))

    @staticmethod
    def _set(module: torch.nn.Module, value) -> None:
        for path, sub in module.named_modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    full = f"{path}.{name}" if path else name
                    sub._parameters[name] = torch.nn.Parameter(value(full, p), requires_grad=False)

    def _layer(self, i: int):
        block = self.net.layers[i]
        self._load(block, f"model.layers.{i}.", "layer")
        with torch.no_grad():
            for name, m in lora.adapters_of(self.source).items():
                if m.enabled and name.startswith(f"layers.{i}."):
                    self.net.get_submodule(name).weight.add_(m.delta_weight().detach().to("cpu", self.dtype))
        return block

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """The final hidden states [n, d] at the positions `pick` (bool [B, T]) of right-padded rows `ids`."""
        cfg = self.source.config
        ids = ids.cpu()
        positions, mask = positions_and_mask(None, ids.shape, cfg, ids.device)
        h = self.net.scale_embedding(self.files.rows("model.embed_tokens.weight", ids).to(self.dtype))
        for i in range(cfg.num_hidden_layers):
            self._layer(i)
            h = self.net.run_layers(h, positions, mask, start=i, end=i + 1)
            self._unload(self.net.layers[i])
            _trim()
        return self.net.norm(h).reshape(-1, h.shape[-1])[pick.cpu().reshape(-1)]

    @torch.no_grad()
    def head_argmax(self, h: torch.Tensor) -> torch.Tensor:
        """argmax over the vocabulary of h Wᵀ, the head read HEAD_BLOCK rows at a time (ties: the first index,
        as one argmax over all of it)."""
        vocab = self.files.where[self.head][2][0]
        best = torch.full((h.shape[0],), -math.inf)
        arg = torch.zeros(h.shape[0], dtype=torch.long)
        logits = torch.empty(h.shape[0], HEAD_BLOCK, dtype=self.dtype)
        for start in range(0, vocab, HEAD_BLOCK):
            w = self._read("head", self.head, start, start + HEAD_BLOCK)
            v, j = torch.matmul(h, w.t(), out=logits[:, :w.shape[0]]).float().max(-1)
            better = v > best
            best, arg = torch.where(better, v, best), torch.where(better, j + start, arg)
        del logits
        _trim()
        return arg

    def argmax_at(self, ids: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """The twin's greedy choice at each picked position, flattened in row order."""
        return self.head_argmax(self.hidden(ids, pick))
