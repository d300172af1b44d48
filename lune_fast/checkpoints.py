"""Training checkpoints: the adapter, the optimiser and the schedule as safetensors + JSON (never pickle),
written atomically, and refused on resume when the run's settings differ."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from . import lora
from .io import atomic_output_dir


def _fingerprint(settings, lora_settings: lora.LoraSettings) -> dict:
    """The settings as the checkpoint's JSON holds them (tuples become lists), so that a fresh run's and a saved
    one's compare equal."""
    d = asdict(settings)
    d.pop("checkpoint_every", None)
    return json.loads(json.dumps({"train": d, "lora": lora.settings_dict(lora_settings)}))


def save_checkpoint(folder: Path, step: int, model, opt, sched, settings, work: list | None = None,
                    references: list[torch.Tensor] | None = None) -> None:
    """references: each micro-batch's reference log-probs (the trainer's NPO reference, read off the run's first
    forward: a resumed run cannot take them again)."""
    from safetensors.torch import save_file

    with atomic_output_dir(Path(folder), overwrite=True) as tmp:
        tensors, opt_state = {}, {}
        for name, m in lora.adapters_of(model).items():
            for part in ("lora_A", "lora_B"):
                p = getattr(m, part)
                tensors[f"{name}.{part}"] = p.detach().cpu().contiguous()
                # the optimiser's tensors for p, whatever they are (AdamW's moments and step, settle's lengths)
                kept = {k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
                for k, v in kept.items():
                    tensors[f"{name}.{part}.{k}"] = v.detach().cpu().contiguous()
                if kept:
                    opt_state[f"{name}.{part}"] = sorted(kept)
        for i, ref in enumerate(references or []):
            tensors[f"reference.{i}"] = ref.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"step": step, "opt_state": opt_state, "scheduler": sched.state_dict(),
                "fingerprint": _fingerprint(settings, model.lora_settings), "work": work,
                "references": len(references) if references is not None else None}
        meta["scheduler"].pop("lr_lambdas", None)
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


class CheckpointMismatch(ValueError):
    pass


def load_checkpoint(folder: Path, model, opt, sched, settings) -> tuple[int, list | None, list | None]:
    """Restores adapter, optimiser and schedule; returns the step, the sequences still being trained and the
    micro-batches' reference log-probs (None in a checkpoint without them)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    if meta.get("fingerprint") != _fingerprint(settings, model.lora_settings):
        raise CheckpointMismatch(f"{folder}: the checkpoint was made with other settings; rerun with the same "
                                 f"options, or remove the folder to start again")
    tensors = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for name, m in lora.adapters_of(model).items():
            for part in ("lora_A", "lora_B"):
                p = getattr(m, part)
                p.copy_(tensors[f"{name}.{part}"])
                key = f"{name}.{part}"
                if key in meta.get("opt_steps", {}):  # a checkpoint from before opt_state (AdamW's only)
                    opt.state[p] = {"step": torch.tensor(meta["opt_steps"][key]),
                                    "exp_avg": tensors[f"{key}.exp_avg"].to(p.device).clone(),
                                    "exp_avg_sq": tensors[f"{key}.exp_avg_sq"].to(p.device).clone()}
                for k in meta.get("opt_state", {}).get(key, []):
                    t = tensors[f"{key}.{k}"]  # a 0-d count (AdamW's step) stays on the CPU, as torch keeps it
                    opt.state[p][k] = t.clone() if t.dim() == 0 else t.to(p.device).clone()
    sched_state = meta["scheduler"]
    sched.last_epoch = sched_state["last_epoch"]
    sched._step_count = sched_state.get("_step_count", sched.last_epoch + 1)
    for group, lr in zip(opt.param_groups, sched_state.get("_last_lr", [])):
        group["lr"] = lr
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    n_refs = meta.get("references")
    refs = [tensors[f"reference.{i}"] for i in range(n_refs)] if n_refs is not None else None
    return int(meta["step"]), meta.get("work"), refs
