"""The merged model as a GGUF file that llama.cpp (and Ollama, and transformers' GGUF loader) runs.

Everything GGUF-specific comes from the `gguf` library: the writer, the tensor names (its tensor-name map for
the architecture), the quantizers and the tokenizer's vocabulary and special tokens. What is ours: which
tensors get which type (llama.cpp's own choice for a tied model: 1-D tensors float32, the embedding at q8_0
when the blocks go to 4 bits), and the one layout change llama.cpp's converter makes for the llama
architecture: q and k rows interleaved per head, the pairs its rope rotates, where Hugging Face keeps the two
halves apart.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
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
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
                 "gemma3_text": ("GEMMA3", False)}


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
        if cfg.norm_offset and hf.endswith("norm.weight"):  # Gemma: llama.cpp stores the norm's factor, (1 + w)
            w = w + cfg.norm_offset
        if rope_order and hf.endswith("q_proj.weight"):
            w = rope_rows(w, cfg.num_attention_heads)
        elif rope_order and hf.endswith("k_proj.weight"):
            w = rope_rows(w, cfg.num_key_value_heads)
        out[name] = w.contiguous()
    return out


def tensor_type(name: str, shape: tuple[int, ...], quant: str, edited: bool = False):
    """The GGML type a tensor (by its GGUF name or the model's) is stored as: 1-D tensors float32; the
    embedding and output head as QUANTS says; a matrix whose rows do not split into the type's blocks falls
    back to float16, as llama.cpp does. `edited`: a weight an adapter was merged into, which a 4-bit export
    keeps at the embedding's 8 bits — an edit smaller than half a 4-bit step rounds away, and the default
    model's weights already sit on the q4_1 grid (RESULTS.md section 10); a few matrices, a few MiB."""
    import gguf

    blocks, embedding, _ = QUANTS[quant]
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    head = name in ("token_embd.weight", "output.weight") or name.startswith(("embed_tokens.", "lm_head."))
    kind = embedding if head or (edited and blocks.startswith("Q4")) else blocks
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
        if ".lora_" not in k:  # a weight with an adapter on it is one the export merges it into
            p.copy_(round_trip(p, tensor_type(k.replace(".base.", "."), tuple(p.shape), quant, ".base." in k)))


@torch.no_grad()
def edit_on_rounded_base(model: Transformer, quant: str) -> None:
    """Round each frozen weight that carries an adapter to the type the base's own export stores it in, before
    the adapter is merged. A 4-bit export keeps those matrices at 8 bits (tensor_type); merged into the
    full-precision weight, they would also shed the 4-bit rounding the base file has, a change beside the edit
    that cost neighbours the base at that type answers. Merged into the rounded weight, the export differs from
    the base's export at the same type by the edit alone (and the 8-bit rounding). No change for other types."""
    from . import lora

    for name, m in lora.adapters_of(model).items():
        w = m.base.weight
        plain = tensor_type(name + ".weight", tuple(w.shape), quant)
        if plain != tensor_type(name + ".weight", tuple(w.shape), quant, edited=True):
            w.copy_(round_trip(w, plain))


def merged_for_export(folder: Path, adapter: Path, quant: str) -> tuple[Transformer, frozenset]:
    """The model of `folder` in float32 (each tensor is rounded once, to the file's type) with the adapter
    merged in as a `quant` export stores it (edit_on_rounded_base), and the names of the modules it changed."""
    from . import lora
    from .weights import load_model

    model = load_model(folder)
    lora.load_adapter(model, adapter)
    edited = frozenset(lora.adapters_of(model))
    edit_on_rounded_base(model, quant)
    lora.merge_and_unload(model)
    return model, edited


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
            edit_on_rounded_base(model, quant)
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
               overwrite: bool = False, tokenizer_from: Path | None = None, edited: frozenset = frozenset()
               ) -> Path:
    """The model (already merged) as a GGUF of type `quant`, with the tokenizer and chat template of the
    model folder `folder`; written to a temporary file beside `out` and renamed. A SentencePiece model (Gemma 3)
    takes its tokenizer from a GGUF: `tokenizer_from`, else the one the embedded model was converted from.
    `edited`: the modules an adapter was merged into ('layers.3.mlp.down_proj'), which tensor_type keeps at 8
    bits in a 4-bit file."""
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
        if cfg.model_type == "gemma3_text":
            with nullcontext(tokenizer_from) if tokenizer_from else embedded_source_gguf(Path(folder)) as src:
                _copy_tokenizer(w, src)
        else:
            _write_tokenizer(w, Path(folder), cfg, carried.get("tokenizer.ggml.pre", "default"))
        names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
        edited_names = {names.get_name(f"model.{m}.weight", try_suffixes=(".weight",)) for m in edited}
        for tname, t in gguf_tensors(model).items():
            if tname == "output.weight" and cfg.tie_word_embeddings:
                continue
            ty = tensor_type(tname, tuple(t.shape), quant, tname in edited_names)
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
    if cfg.model_type == "gemma3_text":  # what llama.cpp's converter writes for gemma3
        window = next((x for x in cfg.windows if x is not None), None)
        if window is not None:
            w.add_sliding_window(window)
        if cfg.local_rope_theta is not None:
            w.add_rope_freq_base_swa(cfg.local_rope_theta)
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


def _copy_tokenizer(w, source: Path) -> None:
    """Every tokenizer.* field of the GGUF `source` (a SentencePiece vocabulary with its scores and token types,
    the special tokens, the chat template), as they are."""
    import gguf

    fields = gguf.GGUFReader(source).fields
    for key, f in fields.items():
        if key.startswith("tokenizer."):
            kind = f.types[0]
            sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), kind, sub_type=sub)


@contextmanager
def embedded_source_gguf(folder: Path):
    """The GGUF an embedded model's folder was converted from, inside the block (the default model's file in its
    package; Gemma 3's assembled again from its packages into a temporary folder beside the cache's)."""
    import tempfile

    from .weights import EMBEDDED, WeightsError, embedded_model_path, find_gguf

    for key, emb in EMBEDDED.items():
        here = embedded_model_path(key)
        if Path(folder).resolve() == here.resolve():
            with tempfile.TemporaryDirectory(dir=here.parent, prefix=f".{emb.folder}.gguf-") as scratch:
                try:
                    yield find_gguf(emb, Path(scratch))
                except WeightsError as e:
                    raise ExportError(f"the tokenizer comes from the GGUF {key} was converted from: {e}") from None
            return
    raise ExportError(f"{folder}: a Gemma 3 export takes its SentencePiece tokenizer from a GGUF of the same model; "
                      f"only the embedded gemma3-270m has one here")


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


# -- a LoRA adapter as llama.cpp loads one (`--lora FILE`), over any base of the same architecture --------------
def lora_gguf_tensors(cfg: ModelConfig, settings, state: dict[str, torch.Tensor]
                      ) -> tuple[float, dict[str, torch.Tensor]]:
    """The adapter as llama.cpp's own LoRA converter writes it: for each adapted weight `<gguf name>.lora_a`
    [r, in] and `.lora_b` [out, r] (B's rows in llama.cpp's q/k row order, as the weight's), and the
    `adapter.lora.alpha` llama.cpp scales each pair by (alpha / the pair's rank; alpha 0: scale 1). Where no single
    alpha gives every module its PEFT scale (per-module alpha_pattern, rsLoRA), alpha is 0 and each B carries its
    own scale (folded in float32). Returns (alpha, tensors)."""
    import gguf

    from . import lora

    arch, rope_order = ARCHITECTURES[cfg.model_type]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), cfg.num_hidden_layers)
    modules = sorted({lora.split_peft_key(k)[0] for k in state})
    scales = {m: settings.scale_of(m) for m in modules}
    ranks = {m: settings.rank_of(m) for m in modules}
    alphas = {scales[m] * ranks[m] for m in modules}
    if all(v == 1.0 for v in scales.values()):
        alpha, fold = 0.0, False
    elif not settings.rslora and len(alphas) == 1:
        alpha, fold = alphas.pop(), False
    else:
        alpha, fold = 0.0, True
    out = {}
    for m in modules:
        hf = f"{lora.PEFT_MODULE_PREFIX}{m}.weight"
        name = names.get_name(hf, try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"adapted module {m!r} has no GGUF name for architecture {arch.lower()}")
        a = state[lora.peft_key(m, "lora_A")].float()
        b = state[lora.peft_key(m, "lora_B")].float()
        if fold:
            b = b * scales[m]
        if rope_order and m.endswith("q_proj"):
            b = rope_rows(b, cfg.num_attention_heads)
        elif rope_order and m.endswith("k_proj"):
            b = rope_rows(b, cfg.num_key_value_heads)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a.contiguous(), b.contiguous()
    return alpha, out


def write_lora_gguf(adapter: Path, out: Path, name: str | None = None, overwrite: bool = False) -> Path:
    """The PEFT adapter in `adapter` (or a lifelong state folder, which holds one) as a GGUF LoRA adapter for
    llama.cpp, float32 (small: exact), written to a temporary file beside `out` and renamed. The base model is
    the one adapter_config.json names; its config.json gives the architecture and the heads."""
    import gguf
    from safetensors.torch import load_file

    from . import lora
    from .weights import resolve_model_dir

    adapter = Path(adapter)
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        state = load_file(str(adapter / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{adapter}: not a readable PEFT adapter folder ({e})") from None
    base = resolve_model_dir(config.get("base_model_name_or_path") or "default")
    cfg = ModelConfig.from_file(base / "config.json")
    if cfg.model_type not in ARCHITECTURES:
        raise ExportError(f"model_type {cfg.model_type!r} cannot be exported to GGUF yet "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    settings = lora.settings_from_peft(config, cfg.num_hidden_layers, str(adapter / "adapter_config.json"))
    alpha, tensors = lora_gguf_tensors(cfg, settings, state)
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[cfg.model_type][0])
    with atomic_output_file(Path(out), overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name or adapter.resolve().name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tname, t in tensors.items():
            w.add_tensor(tname, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)
