"""A minimal frozen decoder for the Llama family (llama, mistral, qwen2) and Gemma 3 (gemma3_text).

The whole model is this file (greedy decoding is lune_fast.generate); what Gemma 3 changes from a Llama block is
a handful of config switches (ModelConfig, "Gemma switches"). It knows nothing of LoRA or training:
lune_fast.lora swaps the projection modules for adapted ones, and the trainer calls the pieces (embed,
run_layers, norm) separately so that it can cache the frozen prefix and take hidden states at answer
positions only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.frozen_linear import few_rows, frozen_linear
from .ops import decode_attention, decode_layer
from .ops import rms_norm as rms_norm_op
from .recompute import recomputed

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
# transformers writes config.json as the difference from its class defaults; these are Gemma3TextConfig's.
GEMMA3_DEFAULTS = {"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                   "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_position_embeddings": 131_072}
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ConfigError(ValueError):
    """A config.json the model cannot be built from."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Gemma switches (the Llama family leaves them all at these values)
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w), in float32 before the cast back
    sandwich_norms: bool = False  # norms after attention and after the MLP as well as before them
    qk_norm: bool = False  # RMSNorm over each head's q and k before rope
    embed_scale: float = 1.0  # embeddings are multiplied by this (√hidden for Gemma)
    attn_scale: float | None = None  # q·k scale; None = head_dim ** -0.5
    # per layer: its sliding window (None = full attention); empty = sliding_window for every layer
    windows: tuple = ()
    # rope of the windowed layers when it differs from the full-attention layers' (Gemma 3); None = the same
    local_rope_theta: float | None = None

    def __post_init__(self):
        if not self.windows:
            self.windows = (self.sliding_window,) * self.num_hidden_layers

    def local_rope(self, layer: int) -> bool:
        return self.local_rope_theta is not None and self.windows[layer] is not None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if mt == "gemma3_text":
            d = {**GEMMA3_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise ConfigError(f"{source}: field {key!r} must be a positive integer, found {d.get(key)!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # transformers >= 5 nests rope settings in rope_parameters; older configs keep rope_theta at the top
        # level and the scaling in rope_scaling ("type" or "rope_type").
        rope = dict(d.get("rope_parameters") or {})
        local_theta = None
        if mt == "gemma3_text":  # one rope per layer kind, nested by kind (or rope_local_base_freq, older)
            local = rope.pop("sliding_attention", None) or {}
            rope = rope.pop("full_attention", None) or rope
            local_theta = float(local.get("rope_theta", d["rope_local_base_freq"]))
            if local.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: rope type {local['rope_type']!r} of the sliding layers is not "
                                  f"supported (default)")
        scaling = d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type not in ("default", "llama3", "linear"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3)")
        rope_scaling = None
        src = {**scaling, **rope}
        if rope_type == "llama3":
            rope_scaling = {k: src[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
        elif rope_type == "linear":
            rope_scaling = {"factor": float(src["factor"])}
        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = d.get("sliding_window") if mt == "mistral" else None
        if mt == "qwen2" and d.get("use_sliding_window"):
            sliding = d.get("sliding_window")
        gemma = cls._gemma_switches(d, source) if mt == "gemma3_text" else {}
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos, pad_token_id=d.get("pad_token_id"),
            local_rope_theta=local_theta, **gemma,
        )

    @staticmethod
    def _gemma_switches(d: dict, source: str) -> dict:
        for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
            if d.get(key):
                raise ConfigError(f"{source}: {key} = {d[key]!r} is not supported (Gemma 3 leaves it off)")
        if d["hidden_activation"] not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_activation {d['hidden_activation']!r} is not supported "
                              f"({', '.join(ACTIVATIONS)})")
        L = d["num_hidden_layers"]
        kinds = d.get("layer_types") or ["sliding_attention" if (i + 1) % d["sliding_window_pattern"] else
                                         "full_attention" for i in range(L)]
        if len(kinds) != L or set(kinds) - {"sliding_attention", "full_attention"}:
            raise ConfigError(f"{source}: layer_types must list sliding_attention or full_attention for each of "
                              f"the {L} layers")
        return dict(hidden_act=d["hidden_activation"], norm_offset=1.0, sandwich_norms=True, qk_norm=True,
                    embed_scale=d["hidden_size"] ** 0.5, attn_scale=float(d["query_pre_attn_scalar"]) ** -0.5,
                    windows=tuple(d["sliding_window"] if k == "sliding_attention" else None for k in kinds))

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json in the model folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, str(path))


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    d = cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling is None or local:
        return inv
    if "low_freq_factor" not in cfg.rope_scaling:  # linear: every position divided by the factor
        return inv / cfg.rope_scaling["factor"]
    # Llama 3.1 frequency-dependent scaling: long wavelengths are divided by `factor`, short ones kept,
    # and the band between is interpolated.
    s = cfg.rope_scaling
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(mid, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = rms_norm_op(x, self.weight, self.eps, self.offset)  # one C++ op where no gradient is taken
        if fused is not None:
            return fused
        # with a gradient, x is kept instead of the float32 copies this makes (lune_fast.recompute)
        return recomputed(self._torch_path, x)

    def _torch_path(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: scale by (1 + w) in float32, then cast
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        # Llama: cast back before the weight, as the reference implementation does
        return self.weight * xf.to(x.dtype)


def rms_norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


@dataclass
class AttnMask:
    """How the keys of one forward are masked.

    causal_only: right-padded or unpadded rows, plain causal attention (pads sit after every real token, so
    real positions never see them). Otherwise `allowed` is a bool mask [B, 1, Tq, Tk] (True = attend).
    """
    causal_only: bool = True
    allowed: torch.Tensor | None = None

    @classmethod
    def packed(cls, segments: torch.Tensor) -> "AttnMask":
        """Several sequences packed into each row: segments [B, T] holds each token's sequence id (-1 for
        padding). Block-diagonal causal attention; a padding token sees only itself (no empty softmax row)."""
        T = segments.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        same = segments[:, :, None] == segments[:, None, :]
        eye = torch.eye(T, dtype=torch.bool, device=segments.device)
        return cls(False, ((same & causal) | eye)[:, None])

    def windowed(self, window: int | None, Tq: int, Tk: int, device) -> "AttnMask":
        """This mask for a layer that sees only the last `window` keys (the queries are the last Tq of Tk
        keys). Packed rows need nothing more: keys of one sequence are as far apart as their positions."""
        if window is None or Tk <= window:
            return self
        qi = torch.arange(Tk - Tq, Tk, device=device)[:, None]
        kj = torch.arange(Tk, device=device)[None, :]
        near = kj > qi - window
        return AttnMask(False, (near & (kj <= qi))[None, None] if self.causal_only else self.allowed & near)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v with grouped-query heads. On CPU in reduced precision, torch's SDPA kernels
    are several times slower than plain matmuls at the short lengths unlearning uses (RESULTS.md section 5,
    "Where the time went"), so that case takes the explicit path; everything else takes SDPA, and so does one
    query against a cache (a decoding step: 7 against 77 µs a layer in bf16, RESULTS.md section 13)."""
    B, H, T, D = q.shape
    kvh = k.shape[1]
    if q.is_cuda or q.dtype == torch.float32 or T == 1:
        if mask.causal_only:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=H != kvh, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, enable_gqa=H != kvh, scale=scale)
    Tk = k.shape[2]  # T > 1 here
    blocked = ~torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T) if mask.causal_only \
        else ~mask.allowed.unsqueeze(2)
    # with a gradient, q, k and v are kept and the probabilities ([heads, T, T] a row, in float32 and bf16) are
    # computed again in the backward (lune_fast.recompute)
    return recomputed(lambda q, k, v: _explicit_attention(q, k, v, blocked, scale or D ** -0.5), q, k, v)


def _explicit_attention(q, k, v, blocked: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, T, D = q.shape
    kvh = k.shape[1]
    g = H // kvh
    scores = (q.view(B, kvh, g, T, D) @ k.unsqueeze(2).transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(blocked, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return (p @ v.unsqueeze(2)).view(B, H, T, D)


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these batch rows go on decoding."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class Linear(nn.Linear):
    """A frozen projection. With `pack` (Transformer.pack_weights), its product on a CPU reads oneDNN's
    prepacked copy of the weight (lune_fast.kernels.frozen_linear): the same product, less time per call."""
    pack = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias, self.pack)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.window, self.scale = cfg.windows[layer], cfg.attn_scale
        self.q_proj = Linear(h, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = Linear(h, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = Linear(h, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_heads * hd, h, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = rms_norm(cfg, hd), rms_norm(cfg, hd)

    def step_keys(self, mask: AttnMask, B: int) -> tuple[torch.Tensor | None, int, float]:
        """A decoding step's keys as the C++ ops take them: the key mask [B, keys] (None: every key), the
        window (0: none) and the scale."""
        return (None if mask.causal_only else mask.allowed.view(B, -1), self.window or 0,
                self.scale or self.head_dim ** -0.5)

    def project_qkv(self, x):
        """The three input projections; an instance may override this to run them as one grouped op."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask: AttnMask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and T == 1:  # a decoding step: one C++ op where it applies
            o = decode_attention(q.view(B, self.n_heads, self.head_dim), k.view(B, self.n_kv, self.head_dim),
                                 v.view(B, self.n_kv, self.head_dim), cos.view(B, -1), sin.view(B, -1),
                                 cache.k[layer], cache.v[layer], cache.length, *self.step_keys(mask, B))
            if o is not None:
                return self.o_proj(o.view(B, 1, self.n_heads * self.head_dim))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k = cache.k[layer][:, :, :start + T]
            v = cache.v[layer][:, :, :start + T]
        o = attention(q, k, v, mask.windowed(self.window, T, k.shape[2], x.device), self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, m, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(h, m, bias=b)
        self.up_proj = Linear(h, m, bias=b)
        self.down_proj = Linear(m, h, bias=b)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def project_gate_up(self, x):
        """Both input projections; an instance may override this to run them as one grouped op."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.project_gate_up(x)
        return self.down_proj(recomputed(self._gated, gate, up))  # act(gate) not kept for the backward

    def _gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = rms_norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = rms_norm(cfg)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = rms_norm(cfg)
            self.post_feedforward_layernorm = rms_norm(cfg)
        # the arithmetic ops.decode_layer computes: Llama's (no sandwich or q/k norms, SiLU, norms times w, no
        # bias after the attention's input projections)
        self.one_op = not (cfg.sandwich_norms or cfg.qk_norm or cfg.mlp_bias or cfg.norm_offset) \
            and cfg.hidden_act == "silu"

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        if cache is not None and x.shape[1] == 1:  # a decoding step: one C++ op where it computes the same
            out = self.decode_step(x, cos, sin, mask, cache, layer)
            if out is not None:
                return out
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        if not self.sandwich:  # Llama: post_attention_layernorm is the MLP's input norm
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        # Gemma: attention and MLP outputs are normed too, before they join the residual
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def decode_step(self, x, cos, sin, mask, cache, layer):
        """This layer's decoding step as one op (ops.decode_layer: the same kernels as the modules, called from
        C++) for a Llama-family layer whose seven projections are plain frozen Linears taking the few-rows
        product, down_proj's maybe with an adapter (its ranks added as its inference adds them); None elsewhere
        (an adapter on another projection, Gemma's norms, a bias the op does not take)."""
        if not self.one_op:
            return None
        # submodules from _modules, not nn.Module.__getattr__: this runs for every layer of every decoded token
        # (the checks took ~30 µs a layer through attribute lookups, 2 of a 14 ms step)
        a, f = self._modules["self_attn"], self._modules["mlp"]
        am, fm = a._modules, f._modules
        q, k, v, o = am["q_proj"], am["k_proj"], am["v_proj"], am["o_proj"]
        g, u, d = fm["gate_proj"], fm["up_proj"], fm["down_proj"]
        if not (type(q) is type(k) is type(v) is type(o) is type(g) is type(u) is Linear and q.pack
                and "project_qkv" not in a.__dict__ and "project_gate_up" not in f.__dict__
                and few_rows(x, q.weight)):
            return None  # an adapter on the layer but for down_proj's, a sharded model, many rows
        down = (d.weight, None, None) if type(d) is Linear else \
            d.decode_ranks(x.dtype) if hasattr(d, "decode_ranks") else None
        if down is None:
            return None  # down_proj's adapter takes another path (a gradient, another backend)
        allowed, window, scale = a.step_keys(mask, x.shape[0])
        n1, n2 = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
        return decode_layer(x, n1.weight, q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, n2.weight,
                            g.weight, u.weight, down[0], cos, sin, cache.k[layer], cache.v[layer], cache.length,
                            allowed, window, scale, n1.eps, a.n_heads, a.n_kv, down[1], down[2])


class Transformer(nn.Module):
    """Frozen decoder. Module names follow the Hugging Face layout (minus the leading "model."), so the
    checkpoint's tensor names and PEFT's adapter keys map onto it directly."""

    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.config = cfg
        with torch.device("meta"):
            # a weight given: nn.Embedding's own init (normal_, even on meta) imports torch._dynamo, ~3 s of a load
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                             _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
            self.norm = rms_norm(cfg)
            self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # dtype first, still on meta: memory is allocated once, in the final dtype, and only touched by the
        # weight copy (no float32 copy of a bf16 model is ever resident)
        self.to(dtype)
        self.to_empty(device=device)
        self.requires_grad_(False)
        self.packs = False  # pack_weights
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True).to(device)
                             if cfg.local_rope_theta is not None else None, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- pieces the trainer composes -------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, 1, T, head_dim] for integer positions [B, T] (float32 math, cast like the reference);
        local: the windowed layers' rope where it differs (Gemma 3)."""
        freqs = positions[..., None].float() * (self.inv_freq_local if local else self.inv_freq).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scale_embedding(self.embed_tokens(input_ids))

    def scale_embedding(self, h: torch.Tensor) -> torch.Tensor:
        # the scale is rounded to the weights' dtype first, as the reference does
        scale = self.config.embed_scale
        return h if scale == 1.0 else h * torch.tensor(scale, dtype=h.dtype)

    def run_layers(self, h, positions, mask: AttnMask, start: int = 0, end: int | None = None,
                   cache: KVCache | None = None) -> torch.Tensor:
        cfg = self.config
        layers = range(start, cfg.num_hidden_layers if end is None else end)
        ropes = {local: self.rope(positions, h.dtype, local) for local in {cfg.local_rope(i) for i in layers}}
        for i in layers:
            h = self.layers[i](h, *ropes[cfg.local_rope(i)], mask, cache, i)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return frozen_linear(h, self.head_weight, None, self.packs)

    def pack_weights(self, on: bool = True) -> None:
        """Frozen products on a CPU from prepacked weights (on), or plain F.linear (off: a sharded model,
        whose parameters are refilled in place by FSDP). The copies cost the weights' memory once more."""
        self.packs = on
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack = on
            if not on and hasattr(getattr(m, "weight", None), "_lune_packed"):
                del m.weight._lune_packed

    # -- whole forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or final hidden states with return_hidden). `select` (bool [B, T] or flat
        indices into B*T) keeps only those positions, returned flattened [n, V]."""
        positions, mask = positions_and_mask(attention_mask, input_ids.shape, self.config, input_ids.device)
        h = self.norm(self.run_layers(self.embed(input_ids), positions, mask))
        if select is not None:
            h = h.reshape(-1, h.shape[-1])[select.reshape(-1) if select.dtype == torch.bool else select]
        return h if return_hidden else self.logits(h)


def positions_and_mask(attention_mask, shape, cfg: ModelConfig, device) -> tuple[torch.Tensor, AttnMask]:
    """Positions count real tokens only (left padding starts each row at 0); the mask is causal-only
    unless some row has padding before a real token."""
    B, T = shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    am = attention_mask.bool()
    if not bool((~am[:, :-1] & am[:, 1:]).any()):
        # Right padding only: pads come after every real token, so a causal mask is exact for real tokens.
        return torch.arange(T, device=device).expand(B, T), AttnMask()
    positions = (am.long().cumsum(-1) - 1).clamp_min(0)
    return positions, AttnMask(False, allowed_keys(am, T))


def allowed_keys(key_mask: torch.Tensor, Tq: int, offset: int = 0) -> torch.Tensor:
    """bool [B, 1, Tq, Tk]: query i (absolute index offset+i) may see key j if j <= i and the key is real
    (a sliding window is each layer's own: AttnMask.windowed). A padding query sees itself so that no softmax
    row is empty (NaN-free)."""
    Tk = key_mask.shape[-1]
    qi = torch.arange(offset, offset + Tq, device=key_mask.device)[:, None]
    kj = torch.arange(Tk, device=key_mask.device)[None, :]
    allowed = (kj <= qi)[None, None] & key_mask[:, None, None, :]
    return allowed | (qi == kj)[None, None]
