"""LoRA adapters on the frozen transformer: target selection, the adapted linear, PEFT-format save/load,
merge/unmerge.

y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ with W frozen, A [r, in] random, B [out, r] zero, s = alpha / r (or
alpha / √r with rsLoRA). Adapter parameters are float32 master weights whatever the model dtype. The op
itself, with its backends (an addmm chain by default; fused Triton kernels on CUDA, opt-in), is
lune_fast.kernels.lora_linear; the backend is chosen once, when the adapters are attached.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .kernels.frozen_linear import few_rows, frozen_linear as frozen_product
from .kernels.lora_linear import grouped_lora_linear, lora_linear, resolve_backend
from .model import Linear, Transformer

# short name -> (submodule of a block, PEFT / Hugging Face module name)
TARGETS = {
    "q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
_BY_MODULE = {mod: short for short, (_, mod) in TARGETS.items()}


class AdapterError(ValueError):
    """An adapter config or file that cannot be used with this model."""


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'q,k,v' / 'all' / 'mlp' / 'attn' or module names ('gate_proj') -> short names, in canonical order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name == "all":
            out.update(TARGETS)
        elif name == "mlp":
            out.update(("gate", "up", "down"))
        elif name == "attn":
            out.update(("q", "k", "v", "o"))
        elif name in TARGETS:
            out.add(name)
        elif name in _BY_MODULE:
            out.add(_BY_MODULE[name])
        else:
            raise AdapterError(f"unknown LoRA target {name!r}; use q,k,v,o,gate,up,down (or all, mlp, attn)")
    if not out:
        raise AdapterError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in out)


def parse_layers(spec: str | list[int] | tuple[int, ...] | None, n_layers: int) -> tuple[int, ...]:
    """'8-20' (inclusive), '3,5,9', '10%-30%' (of the depth, rounded), 'all' or None -> sorted layer indices,
    checked against the model."""
    if spec is None or spec == "all":
        return tuple(range(n_layers))
    if isinstance(spec, str):
        layers: set[int] = set()
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+(?:\.\d+)?)%\s*-\s*(\d+(?:\.\d+)?)%", part)
            if m:  # a share of the depth: the same place in a model of any size
                lo, hi = (min(n_layers - 1, round(float(g) / 100 * n_layers)) for g in m.groups())
                layers.update(range(lo, max(lo, hi) + 1))
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise AdapterError(f"layer range {part!r} is empty (start > end)")
                layers.update(range(lo, hi + 1))
            elif part.isdigit():
                layers.add(int(part))
            elif part:
                raise AdapterError(f"layers {spec!r}: expected ranges like 8-20 or lists like 3,5,9")
    else:
        layers = {int(i) for i in spec}
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad:
        raise AdapterError(f"layers {bad} are outside the model's 0-{n_layers - 1}")
    if not layers:
        raise AdapterError("no layers selected for LoRA")
    return tuple(sorted(layers))


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("gate", "up", "down")
    layers: tuple[int, ...] = field(default_factory=tuple)  # empty = all layers
    rslora: bool = False
    # PEFT's rank_pattern and alpha_pattern, resolved to module paths ('layers.12.mlp.down_proj'): the modules
    # whose rank or alpha is not `rank` / `alpha` (a lifelong state whose requests sit in several layer windows)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def rank_of(self, module: str) -> int:
        return self.rank_pattern.get(module, self.rank)

    def scale_of(self, module: str) -> float:
        r, alpha = self.rank_of(module), self.alpha_pattern.get(module, self.alpha)
        return alpha / (math.sqrt(r) if self.rslora else r)

    def modules(self, n_layers: int) -> list[str]:
        """The PEFT module paths this layout adapts, layer by layer."""
        return [f"layers.{i}.{TARGETS[t][0]}.{TARGETS[t][1]}" for i in (self.layers or range(n_layers))
                for t in self.targets]


# -- the adapted linear ---------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator | None = None,
                 backend: str = "torch"):
        super().__init__()
        self.base = base
        self.rank, self.scale, self.backend = rank, scale, backend
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        # PEFT's default init: kaiming-uniform A (a=√5), zero B, so the adapted model starts as the base.
        # Drawn on the CPU (the seed's generator lives there), so a seed gives the same A on every device.
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.copy_(torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator))
        self.enabled = True
        self.merged = False
        # a lifelong state's earlier requests (lune_fast.state): their ranks, fixed, with their scale folded
        # into B; they act with this request's adapter and are merged and unmerged with it
        self.earlier_A: torch.Tensor | None = None
        self.earlier_B: torch.Tensor | None = None
        self._earlier_cast: dict = {}  # their casts per dtype (_earlier_as)
        self._ranks_cast = None  # all ranks acting, cast (ranks_as)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        if not self.enabled or self.merged:
            return self.base(x)
        if not torch.is_grad_enabled() and self.backend == "torch":
            return self._inference(x)
        y = lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scale, self.backend)
        if self.earlier_A is not None:
            a, b = self._earlier_as(x.dtype)
            y = y + (x @ a.t()) @ b.t()
        return y

    def _inference(self, x):
        """No autograd. At a decoding step's few rows every rank acting as two few-rows products (ranks_as: per-call
        overheads are most of an adapter's cost at batch 1 on a CPU); else the base product and one addmm, a state's
        earlier ranks as packed frozen products (fixed for the request: packed once)."""
        y = self.base(x)
        if self.base.pack and few_rows(x, self.base.weight):
            a, b = self.ranks_as(x.dtype)
            return y.add_(frozen_product(frozen_product(x, a), b))
        # cast afresh each call: a kept cast cannot see FSDP refilling the unsharded parameters in place
        a_t = self.lora_A.to(x.dtype).t()
        b_t = (self.lora_B * self.scale).to(x.dtype).t()
        y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ a_t, b_t)
        if self.earlier_A is not None:
            a, b = self._earlier_as(x.dtype)
            y.add_(frozen_product(frozen_product(x, a), b))
        return y

    def decode_ranks(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """For the one-op decoding layer (Block.decode_step): (the frozen weight, A, B) whose product it adds as
        _inference would (A, B None when the adapter is off or merged), or None where forward takes another path
        (a gradient, another backend, FSDP) or the base is not the model's frozen Linear."""
        if type(self.base) is not Linear:  # a base the op cannot take
            return None
        if not self.enabled or self.merged:
            return self.base.weight, None, None
        if torch.is_grad_enabled() or self.backend != "torch" or not self.base.pack:  # _inference's few-rows case
            return None
        return (self.base.weight, *self.ranks_as(dtype))

    def ranks_as(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank acting — this adapter's, its scale folded into B, and a lifelong state's earlier ones — as
        one A [R, in] and one B [out, R] in `dtype`, row-major, cast again only when A, B or the scale changed (a
        decoded token reads them once per adapted layer: the casts and small products of each call took 150 µs
        a layer at 100 earlier ranks)."""
        key = (dtype, self.lora_A._version, self.lora_B._version, self.scale)
        kept = self._ranks_cast
        if kept is None or kept[0] != key:
            A, B = self.lora_A.detach(), self.lora_B.detach() * self.scale
            if self.earlier_A is not None:
                A, B = torch.cat([A, self.earlier_A]), torch.cat([B, self.earlier_B], dim=1)
            kept = self._ranks_cast = (key, A.to(dtype).contiguous(), B.to(dtype).contiguous())
        return kept[1], kept[2]

    def _earlier_as(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The earlier ranks' A and B in `dtype`, cast once per request (they are fixed; a state of hundreds of
        ranks would otherwise cast a rank × in matrix per call)."""
        kept = self._earlier_cast.get(dtype)
        if kept is None:
            kept = self._earlier_cast[dtype] = (self.earlier_A.to(dtype), self.earlier_B.to(dtype))
        return kept

    def set_earlier(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Fixed ranks that act beside this adapter: A [R, in], B [out, R] with the scale folded in."""
        if A.shape[1] != self.in_features or B.shape != (self.out_features, A.shape[0]):
            raise AdapterError(f"earlier ranks of shapes {tuple(A.shape)}, {tuple(B.shape)} do not fit a "
                               f"{self.out_features}x{self.in_features} projection")
        self.earlier_A = A.detach().float().to(self.lora_A.device)
        self.earlier_B = B.detach().float().to(self.lora_A.device)
        self._earlier_cast, self._ranks_cast = {}, None

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scale
        return delta if self.earlier_A is None else delta + self.earlier_B @ self.earlier_A

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


# -- attaching, toggling, removing ------------------------------------------------------------------------
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "project_qkv"), ("mlp", ("gate_proj", "up_proj"),
                                                                          "project_gate_up"))


def attach(model: Transformer, settings: LoraSettings, seed: int = 0, backend: str = "auto",
           grouped: bool | None = None) -> dict[str, LoRALinear]:
    """Replace the chosen projections with LoRALinear modules; returns them by PEFT module path
    (e.g. 'layers.12.mlp.down_proj'). Existing adapters are removed first. backend: the LoRA op's
    (kernels.lora_linear.BACKENDS), resolved here for the model's device.

    grouped (default: with the Triton backend): projections that share their input and are all adapted (q/k/v,
    gate/up) run as one fused op over their stacked weights; the frozen weights become views of one
    stacked tensor (no extra memory)."""
    detach(model)
    backend = resolve_backend(backend, model.device)
    layers = settings.layers or tuple(range(model.config.num_hidden_layers))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adapters = {}
    for i in layers:
        block = model.layers[i]
        for t in settings.targets:
            parent_name, mod_name = TARGETS[t]
            parent = getattr(block, parent_name)
            name = f"layers.{i}.{parent_name}.{mod_name}"
            lora = LoRALinear(getattr(parent, mod_name), settings.rank_of(name), settings.scale_of(name), gen,
                              backend)
            setattr(parent, mod_name, lora)
            adapters[name] = lora
    if grouped is None:
        grouped = backend == "triton"
    if grouped:
        for i in layers:
            _group_layer(model.layers[i])
    model.lora_settings = settings
    return adapters


def _group_layer(block) -> None:
    for parent_name, names, hook in GROUPS:
        parent = getattr(block, parent_name)
        mods = [getattr(parent, n) for n in names]
        if not all(isinstance(m, LoRALinear) for m in mods) or len({m.rank for m in mods}) > 1:
            continue  # the fused op stacks equal ranks
        with torch.no_grad():  # stack the frozen weights once; each module keeps a view of its rows
            w_cat = torch.cat([m.base.weight for m in mods])
            offset = 0
            for m in mods:
                n = m.base.out_features
                m.base.weight.data = w_cat[offset:offset + n]
                offset += n
        bias = [m.base.bias for m in mods]
        b_cat = torch.cat(bias) if all(b is not None for b in bias) else None
        setattr(parent, hook, _GroupedProjection(mods, w_cat, b_cat))


class _GroupedProjection:
    """Callable installed as Attention.project_qkv / MLP.project_gate_up: one fused LoRA op for all."""

    def __init__(self, mods: list[LoRALinear], w_cat: torch.Tensor, b_cat: torch.Tensor | None):
        self.mods, self.w_cat, self.b_cat = mods, w_cat, b_cat
        self.splits = [m.out_features for m in mods]

    def __call__(self, x):
        if any(m.merged or not m.enabled or m.earlier_A is not None for m in self.mods):
            return tuple(m(x) for m in self.mods)
        return grouped_lora_linear(x, self.w_cat, self.b_cat, [m.lora_A for m in self.mods],
                                   [m.lora_B for m in self.mods], [m.scale for m in self.mods], self.splits,
                                   self.mods[0].backend)


def frozen_linears(model: Transformer, settings: LoraSettings) -> dict[str, nn.Linear]:
    """The frozen projections `settings` adapts, by PEFT module path, whether or not adapters are attached."""
    return {name: frozen_linear(model, name) for name in settings.modules(model.config.num_hidden_layers)}


def frozen_linear(model: Transformer, module: str) -> nn.Linear:
    """The frozen projection at a PEFT module path ('layers.12.mlp.down_proj'), adapted or not."""
    _, layer, parent_name, mod_name = module.split(".")
    mod = getattr(getattr(model.layers[int(layer)], parent_name), mod_name)
    return mod.base if isinstance(mod, LoRALinear) else mod


@contextmanager
def reading_inputs(model: Transformer, settings: LoraSettings, read):
    """Inside the block, each forward of the frozen model (adapters off) calls read(name, x) with the input
    x [tokens, in] of every projection `settings` adapts. Yields the layer to run up to: nothing after the last
    adapted one is read."""
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: read(n, args[0].reshape(-1, args[0].shape[-1])))
               for n, m in frozen_linears(model, settings).items()]
    try:
        with disabled(model):
            yield max(settings.layers or range(model.config.num_hidden_layers)) + 1
    finally:
        for h in handles:
            h.remove()


def adapters_of(model: Transformer) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def detach(model: Transformer) -> None:
    """Remove every adapter (unmerging first), restoring the plain frozen projections."""
    _remove(model, fold=False)


def _remove(model: Transformer, fold: bool) -> None:
    """Put each adapted projection's frozen linear back, with the adapter folded in (fold) or taken out."""
    for name, m in list(adapters_of(model).items()):
        m.merge() if fold else m.unmerge()
        parent_path, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, m.base)
    _ungroup(model)
    model.lora_settings = None


def _ungroup(model: Transformer) -> None:
    for block in model.layers:
        for parent_name, _, hook in GROUPS:
            getattr(block, parent_name).__dict__.pop(hook, None)


@contextmanager
def disabled(model: Transformer):
    """Run the base model (adapters off) inside the block, e.g. for reference log-probs."""
    mods = list(adapters_of(model).values())
    states = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, s in zip(mods, states):
            m.enabled = s


def trainable_parameters(model: Transformer) -> list[nn.Parameter]:
    """The adapter parameters that train (a keyed adapter's A is fixed)."""
    return [p for m in adapters_of(model).values() for p in (m.lora_A, m.lora_B) if p.requires_grad]


def merge(model: Transformer) -> None:
    for m in adapters_of(model).values():
        m.merge()


def merge_and_unload(model: Transformer) -> None:
    """Fold every adapter into its frozen weight for good and remove the adapter modules."""
    _remove(model, fold=True)


def unmerge(model: Transformer) -> None:
    for m in adapters_of(model).values():
        m.unmerge()


# -- PEFT format ---------------------------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model.model."
PEFT_MODULE_PREFIX = "model."  # the adapted modules' names in the Hugging Face model PEFT wraps


def peft_key(module: str, part: str) -> str:
    """'layers.3.mlp.down_proj', 'lora_A' -> PEFT's tensor name."""
    return f"{PEFT_PREFIX}{module}.{part}.weight"


def split_peft_key(key: str) -> tuple[str, str]:
    """PEFT's tensor name -> (module path, 'lora_A' | 'lora_B'): the inverse of peft_key."""
    module, part, _ = key[len(PEFT_PREFIX):].rsplit(".", 2)
    return module, part


def adapter_state(model: Transformer, whole=lambda t: t) -> dict[str, torch.Tensor]:
    """PEFT keys -> float32 CPU tensors. `whole` turns a parameter into a plain tensor (the identity, unless
    the parameters are sharded: lune_fast.distributed.adapter_state passes its gather)."""
    out = {}
    for name, m in adapters_of(model).items():
        out[peft_key(name, "lora_A")] = whole(m.lora_A.detach()).float().cpu().contiguous()
        out[peft_key(name, "lora_B")] = whole(m.lora_B.detach()).float().cpu().contiguous()
    return out


def peft_config(settings: LoraSettings, base_model: str, n_layers: int) -> dict:
    layers = list(settings.layers or range(n_layers))
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": settings.rslora, "fan_in_fan_out": False, "init_lora_weights": True,
        "target_modules": sorted(TARGETS[t][1] for t in settings.targets),
        "layers_to_transform": layers, "layers_pattern": "layers", "inference_mode": True,
        "modules_to_save": None,
        # PEFT matches these keys against the base model's module names ("model.layers.12.mlp.down_proj")
        "rank_pattern": {PEFT_MODULE_PREFIX + m: r for m, r in settings.rank_pattern.items()},
        "alpha_pattern": {PEFT_MODULE_PREFIX + m: a for m, a in settings.alpha_pattern.items()},
    }


def _patterns(cfg: dict, field_name: str, modules: list[str], kind, source: str) -> dict:
    """A PEFT rank_pattern / alpha_pattern resolved to our module paths, matched as PEFT matches it: the first
    key that, as a regular expression, matches the end of the module's name after a dot."""
    pattern = cfg.get(field_name) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{source}: {field_name} must be an object of module pattern -> value, found {pattern!r}")
    out = {}
    for key, value in pattern.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or \
                (kind is int and value != int(value)):
            raise AdapterError(f"{source}: {field_name}[{key!r}] must be a positive {kind.__name__}, found {value!r}")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterError(f"{source}: {field_name} key {key!r} is not a regular expression ({e})") from None
    for m in modules:
        full = PEFT_MODULE_PREFIX + m
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", full)), None)
        if key is not None:
            out[m] = kind(pattern[key])
    return out


def save_adapter(folder: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Write adapter_model.safetensors + adapter_config.json into an (already temporary) folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def settings_from_peft(cfg: dict, n_layers: int, source: str) -> LoraSettings:
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{source}: field 'r' must be a positive integer, found {r!r}")
    if not isinstance(alpha, (int, float)):
        raise AdapterError(f"{source}: field 'lora_alpha' must be a number, found {alpha!r}")
    mods = cfg.get("target_modules")
    if isinstance(mods, str) or not mods:
        raise AdapterError(f"{source}: target_modules must be a list of module names, found {mods!r}")
    unknown = [m for m in mods if m not in _BY_MODULE]
    if unknown:
        raise AdapterError(f"{source}: unknown target module(s) {unknown}; lune_fast adapts "
                           f"{', '.join(_BY_MODULE)}")
    layers = cfg.get("layers_to_transform")
    layers = parse_layers(list(layers) if isinstance(layers, list) else
                          ([layers] if isinstance(layers, int) else None), n_layers)
    settings = LoraSettings(rank=r, alpha=float(alpha), targets=parse_targets(mods), layers=layers,
                            rslora=bool(cfg.get("use_rslora", False)))
    modules = settings.modules(n_layers)
    settings.rank_pattern = _patterns(cfg, "rank_pattern", modules, int, source)
    settings.alpha_pattern = _patterns(cfg, "alpha_pattern", modules, float, source)
    return settings


def load_adapter(model: Transformer, folder: str | Path) -> LoraSettings:
    """Attach the adapter saved in `folder` (PEFT format) to the model, validating config and tensors first."""
    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists():
        raise AdapterError(f"{folder}: no adapter_config.json")
    if not w_path.exists():
        bins = [p.name for p in folder.glob("*.bin")]
        raise AdapterError(f"{folder}: no adapter_model.safetensors" +
                           (f" (found pickle {bins}; lune_fast never unpickles)" if bins else ""))
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    settings = settings_from_peft(cfg, model.config.num_hidden_layers, str(cfg_path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{w_path}: not a readable safetensors file ({e})") from None
    return attach_tensors(model, settings, state, str(w_path))


def attach_tensors(model: Transformer, settings: LoraSettings, state: dict[str, torch.Tensor], source: str
                   ) -> LoraSettings:
    """Attach adapters laid out as `settings` and fill them from PEFT-keyed tensors, each checked (a missing,
    misshaped or extra tensor is an AdapterError naming `source`; the model is left without adapters)."""
    adapters = attach(model, settings)
    expected = set()
    for name, m in adapters.items():
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            key = peft_key(name, part)
            expected.add(key)
            t = state.get(key)
            if t is None:
                detach(model)
                raise AdapterError(f"{source}: tensor {key!r} missing (adapter_config.json lists it)")
            if tuple(t.shape) != tuple(param.shape):
                detach(model)
                raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                                   f"{tuple(param.shape)} (r={settings.rank_of(name)} in adapter_config.json)")
            with torch.no_grad():
                param.copy_(t)
    extra = sorted(set(state) - expected)
    if extra:
        detach(model)
        raise AdapterError(f"{source}: tensor(s) not described by adapter_config.json: {', '.join(extra[:3])}")
    return settings


def settings_dict(s: LoraSettings) -> dict:
    d = asdict(s)
    d["targets"], d["layers"] = list(s.targets), list(s.layers)
    return d
