import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LUNE_FAST_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a relative error that ignores entries near zero."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it exists beside the developers' checkout only)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_dir():
    from lune_fast.weights import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def default_model(default_dir):
    from lune_fast.weights import load_model

    return load_model(default_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from lune_fast.weights import load_tokenizer

    return load_tokenizer(default_dir)


@pytest.fixture(scope="session")
def hf_default(default_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_dir), dtype=torch.float32).eval()


def make_tiny_hf(kind: str, folder: Path, shard: bool = False, **overrides):
    """A small random-weight transformers model of the given family, saved as safetensors."""
    import transformers

    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(overrides)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind](**common)
    torch.manual_seed(0)
    model = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
             "qwen2": transformers.Qwen2ForCausalLM}[kind](cfg).eval()
    with torch.no_grad():  # random norms and biases too, so that a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="100KB" if shard else "5GB")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_lm(kind: str, folder: Path, default_dir: Path, **overrides) -> Path:
    """make_tiny_hf with the default model's vocabulary and tokenizer files: real text runs through it."""
    import shutil

    make_tiny_hf(kind, folder, vocab_size=49152, **overrides)
    for name in TOKENIZER_FILES:
        if (default_dir / name).exists():
            shutil.copy2(default_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A small random-weight Llama (vocabulary 211), saved once for the session."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_hf("llama", folder)
    return folder


@pytest.fixture
def facts_file(request, tmp_path):
    """The test module's FACTS records as a JSONL file."""
    p = tmp_path / "facts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in request.module.FACTS))
    return p


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, default_dir):
    """A small random-weight Llama with the default model's tokenizer: runs every code path in seconds."""
    return make_tiny_lm("llama", tmp_path_factory.mktemp("tiny_lm"), default_dir, num_hidden_layers=4,
                        tie_word_embeddings=True)


def pytest_report_header(config):
    """Which kernels this run exercises: the CPU's bf16 features and any instruction-set limits in force."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    limits = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ]
    return f"cpu: {' '.join(have) or 'unknown'}; instruction-set limits: {' '.join(limits) or 'none'}"
