import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The preserved text's moments that runs keep on disk (preserve.stored_moments) go to a folder of this test
# session, removed at exit, not into the user's cache
_MOMENTS = tempfile.TemporaryDirectory(prefix="lune_fast_moments_")
os.environ.setdefault("LUNE_FAST_MOMENTS", _MOMENTS.name)

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
    from lune_fast.weights import WeightsError, default_model_dir

    try:
        return default_model_dir()
    except WeightsError as e:  # a GPU box has no network: there the suite turns installs off
        if os.environ.get("LUNE_FAST_NO_INSTALL"):
            pytest.skip(f"the embedded model is not installed and LUNE_FAST_NO_INSTALL is set: {e}")
        raise


@pytest.fixture(scope="session")
def default_model(default_dir):
    from lune_fast.weights import load_model

    return load_model(default_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from lune_fast.weights import load_tokenizer

    return load_tokenizer(default_dir)


def hf_float32(folder: Path):
    """transformers' own model of the folder, float32: the oracle of the parity tests."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_default(default_dir):
    return hf_float32(default_dir)


def make_tiny_hf(kind: str, folder: Path, shard: bool = False, **overrides):
    """A small random-weight transformers model of the given family, saved as safetensors."""
    import transformers

    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "gemma3_text":  # a small head, a scale that is not head_dim's, and both kinds of layer
        common = {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 7,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], **common}
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[kind]
    cfg = classes[0](**common)
    torch.manual_seed(0)
    model = classes[1](cfg).eval()
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


# lifelong-state requests on tiny_lm (tests/test_state.py, tests/test_repair.py): a random model gives every answer
# ~1/vocab, so a tiny stop threshold makes each request train its 3 steps
TINY = dict(progress=False, evaluate_before=False, evaluate_after=False, steps=3, layers="1-2", recall_rounds=0,
            stop_prob=1e-12)


@pytest.fixture(scope="module")
def tiny_unlearner(tiny_lm):
    """An Unlearner on tiny_lm, float32 (one per test module)."""
    from lune_fast.api import Unlearner

    return Unlearner(str(tiny_lm), dtype="float32")


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


def check_bf16_parity(folder: Path, fp32_model, tokenizer, prompts: list[str]) -> None:
    """bf16 parity with a derived bound, not one fitted to a CPU: against the float32 model on the same input,
    our bf16 logits are at most twice as far as transformers' own bf16 logits, plus one bf16 rounding of the
    largest logit (2^-8 relative). The last position's argmax agrees with transformers' wherever the float32
    winner leads by more than the two bf16 errors together (there, rounding cannot reorder the top two)."""
    from transformers import AutoModelForCausalLM

    from lune_fast.weights import load_model

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    ours = load_model(folder, dtype=torch.bfloat16)
    ours_err, hf_err, decided = [], [], 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            ref, a, b = fp32_model(ids)[0].double(), ours(ids)[0].double(), hf(ids).logits[0].double()
        ours_err.append(rel_err(a, ref))
        hf_err.append(rel_err(b, ref))
        scale = float(ref.abs().max())
        top2 = ref[-1].topk(2).values
        if float(top2[0] - top2[1]) > (ours_err[-1] + hf_err[-1]) * scale:
            decided += 1
            assert int(a[-1].argmax()) == int(b[-1].argmax()) == int(ref[-1].argmax()), prompt
    assert max(ours_err) <= 2 * max(hf_err) + 2 ** -8, (ours_err, hf_err)
    assert decided >= 1  # at least one prompt has a clear winner, so the argmax check ran
