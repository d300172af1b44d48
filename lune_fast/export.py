"""The merged model as a GGUF file that llama.cpp (and Ollama, and transformers' GGUF loader) runs.

Everything GGUF-specific comes from the `gguf` library: the writer, the tensor names (its tensor-name map for
the architecture), the quantizers and the tokenizer's vocabulary and special tokens. What is ours: which
tensors get which type (llama.cpp's own choice for a tied model: 1-D tensors float32, the embedding at q8_0
when the blocks go to 4 bits), and the one layout change llama.cpp's converter makes for the llama
architecture: q and k rows interleaved per head, the pairs its rope rotates, where Hugging Face keeps the two
halves apart.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .io import atomic_output_file
from .model import ModelConfig, Transformer

# --quant name -> (the blocks' type, the embedding's type, the file type llama.cpp reports)
QUANTS = {
    "f32": ("F32", "F32", "ALL_F32"),
    "f16": ("F16", "F16", "MOSTLY_F16"),
    "bf16": ("BF16", "BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q4_1": ("Q4_1", "Q8_0", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}
# model_type -> (GGUF architecture, whether q/k are stored with llama.cpp's rope row order)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


class ExportError(ValueError):
    """A model or an output the export cannot handle."""


def rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Hugging Face's order (per head: the first halves of the rotated pairs, then the second
    halves) to llama.cpp's (per head: the pairs side by side)."""
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under GGUF names, in GGUF layout, float32."""
    import gguf

    cfg = model.config
    arch, rope_order = ARCHITECTURES[cfg.model_type]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), cfg.num_hidden_layers)
    out = {}
    for k, v in model.state_dict().items():
        hf = k if k.startswith("lm_head") else "model." + k
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf!r} has no GGUF name for architecture {arch.lower()}")
        w = v.detach().float().cpu()
        if rope_order and hf.endswith("q_proj.weight"):
            w = rope_rows(w, cfg.num_attention_heads)
        elif rope_order and hf.endswith("k_proj.weight"):
            w = rope_rows(w, cfg.num_key_value_heads)
        out[name] = w.contiguous()
    return out


def tensor_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type a tensor (by its GGUF name or the model's) is stored as: 1-D tensors float32; the
    embedding and output head as QUANTS says; a matrix whose rows do not split into the type's blocks falls
    back to float16, as llama.cpp does."""
    import gguf

    blocks, embedding, _ = QUANTS[quant]
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    head = name in ("token_embd.weight", "output.weight") or name.startswith(("embed_tokens.", "lm_head."))
    kind = embedding if head else blocks
    t = getattr(gguf.GGMLQuantizationType, kind)
    block = gguf.GGML_QUANT_SIZES[t][0]
    return t if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def encode(w: torch.Tensor, t) -> np.ndarray:
    """A float32 tensor as the bytes (or floats) of GGML type `t`, by the gguf library's quantizers."""
    import gguf

    a = w.numpy()
    if t == gguf.GGMLQuantizationType.F32:
        return a
    if t == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, t)


def round_trip(w: torch.Tensor, t) -> torch.Tensor:
    """What a reader of the file gets back for `w` stored as GGML type `t` (float32)."""
    import gguf

    data = encode(w.float().cpu().contiguous(), t)
    if data.dtype in (np.float32, np.float16):
        return torch.from_numpy(data.astype(np.float32)).to(w.dtype)
    return torch.from_numpy(gguf.quants.dequantize(data, t).astype(np.float32)).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def quantize_in_place(model: Transformer, quant: str) -> None:
    """Give every frozen weight of `model` the value it would have in a GGUF of that type: a model that reads
    back as llama.cpp loads the file, run by our own code. (Blocks run along a row, and the rope row order
    only moves rows, so the values are the file's.)"""
    for k, p in model.state_dict().items():
        if ".lora_" not in k:
            p.copy_(round_trip(p, tensor_type(k.replace(".base.", "."), tuple(p.shape), quant)))


@contextmanager
def quantized(model: Transformer, quant: str | None):
    """Inside the block the model runs as its export at `quant` would: the adapters folded into the weights
    and every weight rounded to the file's type. The weights and adapters are as they were afterwards (the
    saved copies are put back: folding and unfolding would round twice). quant None: no change."""
    if quant is None:
        yield model
        return
    from . import lora

    saved = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    try:
        with torch.no_grad():
            lora.merge(model)
            quantize_in_place(model, quant)
        yield model
    finally:
        with torch.no_grad():
            state = model.state_dict()
            for k, v in saved.items():
                state[k].copy_(v)
        for m in lora.adapters_of(model).values():
            m.merged = False


def write_gguf(model: Transformer, folder: Path, out: Path, quant: str, name: str | None = None,
               overwrite: bool = False) -> Path:
    """The model (already merged) as a GGUF of type `quant`, with the tokenizer and chat template of the
    model folder `folder`; written to a temporary file beside `out` and renamed."""
    import gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        raise ExportError(f"model_type {cfg.model_type!r} cannot be exported to GGUF yet "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    if cfg.rope_scaling is not None:
        raise ExportError("rope scaling (llama3) is not exported yet: llama.cpp needs its rope_freqs tensor")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[cfg.model_type][0])
    with atomic_output_file(Path(out), overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        carried = source_fields(Path(folder))
        _write_metadata(w, cfg, name or Path(folder).name, quant, carried)
        _write_tokenizer(w, Path(folder), cfg, carried.get("tokenizer.ggml.pre", "default"))
        for tname, t in gguf_tensors(model).items():
            if tname == "output.weight" and cfg.tie_word_embeddings:
                continue
            ty = tensor_type(tname, tuple(t.shape), quant)
            data = encode(t, ty)
            w.add_tensor(tname, data, raw_dtype=None if data.dtype in (np.float32, np.float16) else ty)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


def _write_metadata(w, cfg: ModelConfig, name: str, quant: str, carried: dict[str, str]) -> None:
    import gguf

    w.add_type("model")
    w.add_name(name)
    for key in ("license", "organization", "basename", "size_label"):
        if f"general.{key}" in carried:
            getattr(w, f"add_{key}")(carried[f"general.{key}"])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][2]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(w, folder: Path, cfg: ModelConfig, pre: str) -> None:
    """The BPE vocabulary (gguf.vocab reads tokenizer.json), the added tokens typed as llama.cpp's converter
    types them (special ones CONTROL, others USER_DEFINED), merges, special token ids and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{folder}: a GPT-2 style BPE tokenizer.json is needed for the GGUF export ({e})") from None
    tokens = [t if isinstance(t, bytes) else t.encode() for t, _, _ in vocab.all_tokens()]
    tok = AutoTokenizer.from_pretrained(str(folder))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for i, added in tok.added_tokens_decoder.items():
        if i < len(types):
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    for i in range(len(tokens), cfg.vocab_size):  # rows of the embedding no token uses
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # say whether a BOS is prepended, as the tokenizer does it: llama.cpp's default differs between versions
    probe = tok("a").input_ids
    special.add_special_token.setdefault("bos", bool(probe) and probe[0] == tok.bos_token_id)
    special.add_to_gguf(w, quiet=True)


# fields of the GGUF the default model came from that say what it is and how llama.cpp splits its text
_CARRIED = ("general.license", "general.organization", "general.basename", "general.size_label", "tokenizer.ggml.pre")


def source_fields(folder: Path) -> dict[str, str]:
    """_CARRIED's values from the GGUF the model folder was converted from (the default model's), or {}:
    llama.cpp's pre-tokenizer names live in its converter, not in the gguf library, so any other folder gets
    "default" (llama.cpp's generic split)."""
    import gguf

    from .weights import WeightsError, default_model_path, find_default_gguf

    if Path(folder).resolve() != default_model_path().resolve():
        return {}
    try:
        fields = gguf.GGUFReader(find_default_gguf()).fields
    except WeightsError:  # the package was removed after the conversion
        return {}
    return {k: str(fields[k].contents()) for k in _CARRIED if k in fields}
