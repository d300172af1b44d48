"""A lifelong unlearning state: deletion requests over time, composed into one revocable, audited adapter.

The state is a folder:

    adapter_model.safetensors, adapter_config.json   one plain PEFT LoRA adapter: every active request's ranks,
                                                     side by side (rank = their sum, scale 1: each request's
                                                     own scale is folded into its B columns)
    ledger.jsonl                                     one line per request or revocation (the audit trail)
    keys.safetensors                                 each keyed request's subject keys, per adapted projection:
                                                     the next request's ranks are fitted not to read them

A request's ranks are the columns of B and rows of A in the order the ledger lists the active requests, so
revoking one removes exactly its slice. A keyed request takes one rank per fact on each projection of a layer
window, and a projection has room for in_features/2 of them: when the state's first window is full, requests
go to another window of the same width further up (layers 3-9, then 17-23, then 10-16 on the default model;
MEMIT spreads its edits over layers for the same reason), and the adapter's rank differs by layer (PEFT's
rank_pattern). Each update writes a new folder and swaps it in (lune_fast.io), under
a lock beside the folder: a kill leaves the old state or the new one, and two writers take turns.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import lora
from .data import Fact
from .io import atomic_output_dir, file_lock, recover_output_dir

LEDGER, KEYS, ADAPTER = "ledger.jsonl", "keys.safetensors", "adapter_model.safetensors"


class StateError(ValueError):
    """A state folder that cannot be used as asked (not a state, another model, an unknown request)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fact_record(f: Fact) -> dict:
    """A fact as a record read_facts reads back to the same Fact (TOFU's shape for a chat question), for the
    ledger."""
    if f.chat:
        rec = {"question": f.prompt, "answer": f.target, "perturbed_answer": [f.replacement] if f.replacement else [],
               "paraphrased_question": f.paraphrases[0] if f.paraphrases else None}
    else:
        rec = {"prompt": f.prompt, "target": f.target, "replacement": f.replacement, "subject": f.subject,
               "paraphrases": list(f.paraphrases) + [{"prompt": p, "names_subject": False} for p in f.indirect],
               "neighbors": [{"prompt": p, "target": t} for p, t in f.neighbors]}
    return {k: v for k, v in rec.items() if v not in (None, [])}


@dataclass(frozen=True)
class Folded:
    """What State.folded_outside folded into the frozen weights: the state's folder, the requests with ranks
    there and the keyed facts left off name it within a process (cache keys); the ranks themselves [A, B per
    projection] name it anywhere (digest)."""
    folder: str
    requests: tuple[str, ...]
    off: tuple = ()
    ranks: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> tuple:
        """The in-process name, without the tensors (a cache keyed by it does not keep them alive)."""
        return self.folder, self.requests, self.off

    def digest(self) -> str:
        """sha256 over the folded ranks' names, shapes and float32 values, computed once (the text moments and the
        earlier neighbours' sums both name their files by it)."""
        if "_digest" not in self.__dict__:
            h = hashlib.sha256()
            for name in sorted(self.ranks):
                for t in self.ranks[name]:
                    t = t.detach().float().cpu().contiguous()
                    h.update(f"{name}{tuple(t.shape)}".encode())
                    h.update(t.numpy().tobytes())
            object.__setattr__(self, "_digest", h.hexdigest())  # frozen: set past the dataclass's guard
        return self.__dict__["_digest"]


@dataclass
class State:
    """The state as loaded: the ledger, the adapter's layout and tensors (every active rank), and the keys.
    `tensors` hold A [R, in] and B [out, R] per adapted projection (PEFT module path), scale folded into B."""
    folder: Path
    entries: list[dict] = field(default_factory=list)
    config: dict | None = None
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # request id -> linear -> [n, in]

    # -- reading ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> "State":
        """The state in `folder`; an empty one when it does not exist yet. Call it under `locked`."""
        folder = Path(folder)
        recover_output_dir(folder)
        if not folder.exists():
            return cls(folder)
        ledger = folder / LEDGER
        if not ledger.exists():
            raise StateError(f"{folder} exists and is not a lune_fast state (no {LEDGER}); give --into a new "
                             f"folder or one made by --into")
        entries = []
        for n, line in enumerate(ledger.read_text().splitlines(), start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StateError(f"{ledger}:{n}: not valid JSON ({e.msg})") from None
        state = cls(folder, entries, json.loads((folder / "adapter_config.json").read_text()))
        if entries and entries[-1].get("adapter_sha256") != file_sha256(folder / ADAPTER):
            raise StateError(f"{folder / ADAPTER} is not the adapter {LEDGER} records last (sha256 differs): the "
                             f"folder was changed by hand")
        from safetensors.torch import load_file

        tensors = load_file(str(folder / ADAPTER))
        # an adapter with nothing active stores one zero rank
        ranks = state.module_ranks({lora.split_peft_key(key)[0] for key in tensors})
        for key, t in tensors.items():
            name, part = lora.split_peft_key(key)
            rank = ranks[name]
            if part == "lora_A":
                state.A[name] = t[:rank]
            else:
                state.B[name] = t[:, :rank]
        if (folder / KEYS).exists():
            for key, t in load_file(str(folder / KEYS)).items():
                rid, name = key.split("|", 1)
                state.keys.setdefault(rid, {})[name] = t
        return state

    def active(self) -> list[dict]:
        """The forget entries not revoked, in the order their ranks sit in the adapter."""
        revoked = {e["request"] for e in self.entries if e["op"] == "revoke"}
        return [e for e in self.entries if e["op"] == "forget" and e["id"] not in revoked]

    @property
    def rank(self) -> int:
        """The active requests' ranks, summed over requests (a projection holds those of its window's)."""
        return sum(e["rank"] for e in self.active())

    def module_ranks(self, modules) -> dict[str, int]:
        """The ranks the active requests have on each adapted projection (PEFT module paths)."""
        active = self.active()
        return {m: sum(e["rank"] for e in active if holds(e, m)) for m in modules}

    def base_layers(self) -> tuple[int, ...]:
        """The layers of the state's first request: the first window, which the others are shifted from."""
        first = next(e for e in self.entries if e["op"] == "forget")
        return tuple(first["settings"]["layers"])

    def window_for(self, layout: lora.LoraSettings, n_layers: int, n_new: int, room: int) -> tuple[int, ...]:
        """The first layer window with room for `n_new` more keyed facts: the first request's window, then the
        same width shifted up the depth by whole widths (those that fit in the model), the farthest first: on
        facts-dev the default model's layers 17-23 keep 0.85 of the neighbours and 10-16 only 0.61 (3-9: 0.955;
        RESULTS.md section 11)."""
        base = self.base_layers() if self.config is not None else tuple(layout.layers)
        width = max(base) - min(base) + 1
        shifts = [k * width for k in range(1, n_layers) if max(base) + k * width < n_layers]
        windows = [tuple(i + shift for i in base) for shift in [0] + shifts[::-1]]
        held = {}
        for e in self.active():
            if e["id"] in self.keys:
                w = tuple(e["settings"]["layers"])
                held[w] = held.get(w, 0) + len(e["records"])
        for w in windows:
            if held.get(w, 0) + n_new <= room:
                return w
        listed = ", ".join(f"layers {w[0]}-{w[-1]}: {held.get(w, 0)}" for w in windows)
        raise StateError(f"{self.folder}: no layer window has room for {n_new} more keyed facts ({room} each; held "
                         f"{listed}); revoke requests or start another state")

    @property
    def facts(self) -> int:
        """The facts forgotten (or replaced): the active requests' records, not counting neighbour repairs."""
        return sum(len(e["records"]) for e in self.active() if not e.get("repair"))

    def records(self, keyed: bool = False) -> list[dict]:
        """The records of the active requests, not the neighbour repairs' (keyed: of every request with keys,
        repairs too, in earlier_keys' row order)."""
        return [r for e in self.active() if (e["id"] in self.keys if keyed else not e.get("repair"))
                for r in e["records"]]

    def repairs(self) -> list[dict]:
        """The active neighbour repairs (lune_fast.repair)."""
        return [e for e in self.active() if e.get("repair")]

    def earlier_facts(self, keyed: bool = False) -> list[Fact]:
        """The active requests' facts (their neighbours are inputs a new request must leave alone; keyed: those
        behind earlier_keys' rows, neighbour repairs too)."""
        from .data import read_facts

        records = self.records(keyed)
        return read_facts(records).facts if records else []

    def keyed_fact_ids(self) -> list[tuple[str, int]]:
        """(request id, index in its records) of each fact of earlier_facts(keyed=True), in that order."""
        return [(e["id"], j) for e in self.active() if e["id"] in self.keys for j in range(len(e["records"]))]

    def _acting(self, name: str, off: frozenset) -> torch.Tensor | None:
        """bool [rank of `name`]: its rows that act, all but those of the keyed facts in `off` (request id,
        index); None when none is left off. A keyed request's row j is its fact j's."""
        if not off:
            return None
        keep = torch.ones(self.A[name].shape[0], dtype=torch.bool)
        for e, start in self._starts(name):
            if e["id"] in self.keys:
                for j in range(e["rank"]):
                    keep[start + j] = (e["id"], j) not in off
        return keep

    def _starts(self, name: str) -> list[tuple[dict, int]]:
        """The active requests with ranks on projection `name`, each with its first row there."""
        out, pos = [], 0
        for e in self.active():
            if holds(e, name):
                out.append((e, pos))
                pos += e["rank"]
        return out

    def _ranks(self, name: str, off: frozenset) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self._acting(name, off)
        return (self.A[name], self.B[name]) if keep is None else (self.A[name][keep], self.B[name][:, keep])

    def entry(self, request_id: str) -> dict:
        for e in self.entries:
            if e["op"] == "forget" and e["id"] == request_id:
                return e
        known = ", ".join(e["id"] for e in self.entries if e["op"] == "forget") or "none"
        raise StateError(f"{self.folder}: no request {request_id!r} (requests: {known})")

    def layout(self, n_layers: int) -> lora.LoraSettings:
        return lora.settings_from_peft(self.config, n_layers, str(self.folder / "adapter_config.json"))

    def earlier_keys(self, keep: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """Every active request's keys, stacked per adapted linear [m, in] (one row per fact of
        earlier_facts(keyed=True); `keep`: only the rows marked)."""
        out: dict[str, list[torch.Tensor]] = {}
        start = 0
        for e in [e for e in self.active() if e["id"] in self.keys]:
            n = len(e["records"])
            rows = None if keep is None else torch.tensor(keep[start:start + n], dtype=torch.bool)
            for name, k in self.keys[e["id"]].items():
                out.setdefault(name, []).append(k if rows is None else k[rows])
            start += n
        return {n: torch.cat(v) for n, v in out.items()}

    # -- checking a new request against the state -------------------------------------------------------
    def check_request(self, layout: lora.LoraSettings, base_model: str, n_layers: int, keyed: bool, room: int,
                      n_new: int) -> tuple[int, ...]:
        """The layers the request's ranks go to: a keyed request's window with room (window_for), else the
        state's layers. A request resolved to other targets or layers than the state's first is refused."""
        if self.config is None:
            return tuple(layout.layers)
        self.check_model(base_model)
        targets, layers = self.layout(n_layers).targets, self.base_layers()
        if (targets, layers) != (layout.targets, tuple(layout.layers)):
            raise StateError(f"{self.folder} adapts {','.join(targets)} at layers {list(layers)}; this request "
                             f"resolved to {','.join(layout.targets)} at {list(layout.layers)}: give the same "
                             f"--targets/--layers as the state's first request")
        return self.window_for(layout, n_layers, n_new, room) if keyed else layers

    def check_model(self, base_model: str) -> None:
        if self.config is not None and self.config.get("base_model_name_or_path") != base_model:
            raise StateError(f"{self.folder} holds requests for {self.config.get('base_model_name_or_path')}, "
                             f"not {base_model}")

    @contextmanager
    def on(self, model):
        """The whole state on `model` as one adapter (as PEFT would load the folder) inside the block, taken off
        afterwards."""
        tensors, config = self.adapter_files()
        lora.attach_tensors(model, lora.settings_from_peft(config, model.config.num_hidden_layers, str(self.folder)),
                            tensors, str(self.folder))
        try:
            yield model
        finally:
            lora.detach(model)

    def attach_earlier(self, model, off: frozenset = frozenset()) -> None:
        """Give each adapted linear of `model` the state's ranks there as fixed earlier ranks, but those of the
        keyed facts in `off` (keyed_fact_ids' pairs)."""
        for name, m in lora.adapters_of(model).items():
            a, b = self._ranks(name, off) if name in self.A else (None, None)
            if a is not None and a.shape[0]:
                m.set_earlier(a, b)

    @contextmanager
    def folded_outside(self, model, layout: lora.LoraSettings, off: frozenset = frozenset()):
        """The state's ranks on projections `layout` does not adapt (other layer windows), but those of the
        keyed facts in `off`, folded into the frozen weights for the block, so that a request is trained and
        checked with the state acting; the weights are put back exactly (a copy) on the way out. Yields what was
        folded (Folded), or None: anything cached about the model's activations inside the block must be keyed
        by it."""
        inside = set(layout.modules(model.config.num_hidden_layers))
        saved, ranks = {}, {}
        folded = [e["id"] for e in self.active() if any(holds(e, n) for n in self.A if n not in inside)]
        try:
            with torch.no_grad():
                for name in [n for n in self.A if n not in inside]:
                    a, b = self._ranks(name, off)
                    if not a.shape[0]:
                        continue
                    w = lora.frozen_linear(model, name).weight
                    saved[name], ranks[name] = w.clone(), (a, b)
                    w.copy_((w.float() + b.to(w.device) @ a.to(w.device)).to(w.dtype))
            yield Folded(str(self.folder.resolve()), tuple(folded), tuple(sorted(off)), ranks) if folded else None
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    lora.frozen_linear(model, name).weight.copy_(w)

    # -- updating -------------------------------------------------------------------------------------------
    def with_request(self, entry: dict, adapter: dict[str, torch.Tensor], config: dict,
                     keys: dict[str, torch.Tensor] | None) -> "State":
        """A new State with the request's ranks appended (adapter: its PEFT tensors, scale config's)."""
        new = State(self.folder, self.entries + [entry], dict(self.config if self.config is not None else config),
                    dict(self.A), dict(self.B), dict(self.keys))
        scale = lora.LoraSettings(rank=config["r"], alpha=config["lora_alpha"],
                                  rslora=bool(config.get("use_rslora"))).scale
        for key, t in adapter.items():
            name, part = lora.split_peft_key(key)
            if part == "lora_A":
                new.A[name] = torch.cat([self.A[name], t]) if name in self.A else t
            else:
                t = t * scale
                new.B[name] = torch.cat([self.B[name], t], dim=1) if name in self.B else t
        if keys:
            new.keys[entry["id"]] = {n: k.float().cpu() for n, k in keys.items()}
        return new

    def without_request(self, request_id: str, entry: dict) -> "State":
        """A new State with the request's ranks and keys removed and `entry` (the revocation) logged."""
        target = self.entry(request_id)
        if target not in self.active():
            raise StateError(f"{self.folder}: request {request_id!r} was revoked already")
        A, B = dict(self.A), dict(self.B)
        for name in [n for n in self.A if holds(target, n)]:
            offset = next(start for e, start in self._starts(name) if e is target)
            end = offset + target["rank"]
            A[name] = torch.cat([self.A[name][:offset], self.A[name][end:]])
            B[name] = torch.cat([self.B[name][:, :offset], self.B[name][:, end:]], dim=1)
        keys = {r: k for r, k in self.keys.items() if r != request_id}
        return State(self.folder, self.entries + [entry], dict(self.config), A, B, keys)

    def next_id(self) -> str:
        """Ledger line ids, in order: r0001, r0002, ... (a revocation gets one too)."""
        return f"r{len(self.entries) + 1:04d}"

    def adapter_files(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The PEFT tensors and config of the whole state: the projections with active ranks, each at scale 1
        (rank and alpha per projection where windows differ: rank_pattern, alpha_pattern). PEFT has no rank 0:
        with nothing active the adapter is one zero rank on the first window (the model unchanged)."""
        ranks = {name: a.shape[0] for name, a in self.A.items() if a.shape[0]}
        tensors = {}
        if not ranks:
            base = set(lora.LoraSettings(targets=lora.parse_targets(self.config["target_modules"]),
                                         layers=self.base_layers()).modules(0))
            for name in sorted(base & set(self.A)):
                tensors[lora.peft_key(name, "lora_A")] = torch.zeros(1, self.A[name].shape[1])
                tensors[lora.peft_key(name, "lora_B")] = torch.zeros(self.B[name].shape[0], 1)
            ranks = {name: 1 for name in base & set(self.A)}
        else:
            for name in ranks:
                tensors[lora.peft_key(name, "lora_A")] = self.A[name].contiguous()
                tensors[lora.peft_key(name, "lora_B")] = self.B[name].contiguous()
        counts = list(ranks.values())
        r = max(set(counts), key=lambda v: (counts.count(v), v))  # the most common rank; the others are patterns
        pattern = {n: k for n, k in sorted(ranks.items()) if k != r}
        layers = sorted({int(n.split(".")[1]) for n in ranks})
        config = {**self.config, "r": r, "lora_alpha": float(r), "use_rslora": False, "layers_to_transform": layers,
                  "rank_pattern": {lora.PEFT_MODULE_PREFIX + n: k for n, k in pattern.items()},
                  "alpha_pattern": {lora.PEFT_MODULE_PREFIX + n: float(k) for n, k in pattern.items()}}
        return tensors, config

    def commit(self) -> None:
        """Write this state over the folder in one swap; the last ledger line gets the new adapter's hash."""
        from safetensors.torch import save_file

        tensors, config = self.adapter_files()
        with atomic_output_dir(self.folder, overwrite=True) as tmp:
            lora.save_adapter(tmp, tensors, config)
            self.entries[-1]["adapter_sha256"] = file_sha256(tmp / ADAPTER)
            self.entries[-1]["rank_after"] = self.rank
            (tmp / LEDGER).write_text("".join(json.dumps(e) + "\n" for e in self.entries))
            keys = {f"{rid}|{name}": k.contiguous() for rid, ks in self.keys.items() for name, k in ks.items()}
            if keys:
                save_file(keys, str(tmp / KEYS))


def holds(e: dict, module: str) -> bool:
    """Whether a forget entry has ranks on the projection `module` (PEFT module path; no layers = all)."""
    layer, name = module.split(".")[1], module.rsplit(".", 1)[1]
    s = e["settings"]
    return lora.parse_targets([name])[0] in lora.parse_targets(s["targets"]) and \
        (not s["layers"] or int(layer) in s["layers"])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def locked(folder: str | Path):
    """The state's lock (a file beside the folder), held for a read-modify-write: one writer at a time."""
    folder = Path(folder).resolve()  # "." has no name to put beside
    folder.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(folder.parent / f".{folder.name}.lock")


def ledger_table(state: State) -> str:
    """The history as a table: one row per request or revocation."""
    active = {e["id"] for e in state.active()}
    rows = [f"{state.folder}: {len(active)} active request(s), {state.facts} facts, rank {state.rank}", "",
            "| id | time | op | facts | rank | layers | forget recall before → after | neighbours after | adapter |",
            "|---|---|---|---|---|---|---|---|---|"]

    def rate(m, key):
        v = (m or {}).get(key)
        return "—" if v is None else f"{v:.2f}"

    for e in state.entries:
        if e["op"] == "forget":
            status = "" if e["id"] in active else " (revoked)"
            layers = e["settings"]["layers"]
            where = f"{layers[0]}-{layers[-1]}" if layers else "all"
            op = "repair" if e.get("repair") else "forget"
            rows.append(f"| {e['id']}{status} | {e['time']} | {op} | {len(e['records'])} | {e['rank']} | {where} | "
                        f"{rate(e.get('before'), 'forget_recall')} → {rate(e.get('after'), 'forget_recall')} | "
                        f"{rate(e.get('after'), 'neighbor_recall')} | {e['adapter_sha256'][:12]} |")
        else:
            after = e.get("after") or {}
            rows.append(f"| {e['id']} | {e['time']} | revoke {e['request']} | {len(e.get('records', []))} | "
                        f"−{e['rank']} | | revoked facts now {rate(after.get('revoked'), 'forget_recall')}, others "
                        f"{rate(after.get('remaining'), 'forget_recall')} | "
                        f"{rate(after.get('remaining'), 'neighbor_recall')} | {e['adapter_sha256'][:12]} |")
    return "\n".join(rows)
