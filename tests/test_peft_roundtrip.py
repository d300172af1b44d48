"""Adapters are checked by loading them into real PEFT, not by reading our own files back."""
import pytest
import torch

from conftest import make_tiny_hf, rel_err
from lune_fast import lora
from lune_fast.weights import load_model, save_model

pytestmark = pytest.mark.numerics  # run again under other instruction sets (Makefile)


def _random_adapter(model, settings, seed=0):
    adapters = lora.attach(model, settings, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in adapters.values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return adapters


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_loads_in_peft_and_matches(tmp_path, kind, rslora):
    from peft import PeftModel

    hf = make_tiny_hf(kind, tmp_path / "base")
    # float64 on both sides: the mapping is what is tested. A float32 bound fitted on one CPU failed on another
    # (Gemma's extra norms amplify float32 rounding to ~1e-5); in float64 what is left is that lune_fast rounds
    # B·scale to float32 once per element (its adapters are float32 master weights), 2^-24 relative, which
    # three layers amplify less than 64× (measured 2-20×, the same on AVX2 and AVX-512)
    model = load_model(tmp_path / "base", dtype=torch.float64)
    settings = lora.LoraSettings(rank=4, alpha=12, targets=("q", "k", "v", "o", "gate", "up", "down"),
                                 layers=(0, 2), rslora=rslora)
    _random_adapter(model, settings)
    (tmp_path / "ad").mkdir()
    lora.save_adapter(tmp_path / "ad", lora.adapter_state(model), lora.peft_config(settings, str(tmp_path / "base"), 3))
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval().double()
    ids = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = peft_model(ids).logits
        got = model(ids)
    assert rel_err(got, ref) <= 64 * 2 ** -24
    with torch.no_grad(), peft_model.disable_adapter():
        assert rel_err(peft_model(ids).logits, ref) > 1e-3  # the adapter really changes the output


def _config_as_transformers_writes_it(folder, tmp_path):
    """Load `folder` with transformers' Auto class and save it again: the config.json it writes."""
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "resaved"))
    return json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_default_model_config_is_what_transformers_writes(default_dir, tmp_path):
    """The converted default model names its architecture (llama.cpp's converter and vLLM read it)."""
    import json

    ours = json.loads((default_dir / "config.json").read_text())
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert ours == _config_as_transformers_writes_it(default_dir, tmp_path)


def test_merged_export_loads_in_transformers(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    make_tiny_hf("llama", tmp_path / "base")
    cfg_path = tmp_path / "base" / "config.json"  # as a GGUF conversion leaves it: no architectures
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "architectures": None}))
    model = load_model(tmp_path / "base")
    _random_adapter(model, lora.LoraSettings(rank=8, alpha=16, targets=("gate", "up", "down", "q"), layers=(1,)))
    ids = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        adapted = model(ids)
    lora.merge_and_unload(model)
    (tmp_path / "merged").mkdir()
    save_model(model, tmp_path / "base", tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(ids).logits, adapted) <= 1e-5
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForCausalLM"]
    assert merged == _config_as_transformers_writes_it(tmp_path / "merged", tmp_path)


def test_load_adapter_validates_before_use(tmp_path):
    import json

    make_tiny_hf("llama", tmp_path / "base")
    model = load_model(tmp_path / "base")
    settings = lora.LoraSettings(rank=4, alpha=8, targets=("q", "v"), layers=(0, 1))
    _random_adapter(model, settings)
    (tmp_path / "ad").mkdir()
    lora.save_adapter(tmp_path / "ad", lora.adapter_state(model), lora.peft_config(settings, "x", 3))
    lora.detach(model)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    good = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**good, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(lora.AdapterError, match=r"unknown target module\(s\) \['lm_head'\]"):
        lora.load_adapter(model, tmp_path / "ad")
    cfg_path.write_text(json.dumps({**good, "r": 8}))
    with pytest.raises(lora.AdapterError, match=r"has shape \(4, 64\), expected \(8, 64\) \(r=8"):
        lora.load_adapter(model, tmp_path / "ad")
    assert not lora.adapters_of(model)  # a refused adapter leaves the model clean
    cfg_path.write_text(json.dumps(good))
    loaded = lora.load_adapter(model, tmp_path / "ad")
    assert loaded.rank == 4 and loaded.targets == ("q", "v")


def test_keyed_adapter_from_a_forget_run_loads_in_peft_and_matches(tiny_lm, tmp_path, monkeypatch):
    """The default (keyed) adapter is a plain LoRA of rank = number of facts, A fixed: PEFT reads it as is, and
    AutoPeftModelForCausalLM finds the base model from the adapter folder alone, offline."""
    import huggingface_hub
    from peft import AutoPeftModelForCausalLM

    from lune_fast.api import Unlearner

    u = Unlearner(str(tiny_lm), dtype="float32")
    records = [{"prompt": "The capital of France is", "target": "Paris"},
               {"prompt": "The author of Hamlet is", "target": "William Shakespeare"},
               {"prompt": "The largest planet is", "target": "Jupiter"}]
    # a random model gives every answer ~1/vocab: a tiny stop threshold makes it train its 3 steps
    r = u.forget(records, progress=False, evaluate_before=False, evaluate_after=False, steps=3, layers="1-2",
                 recall_rounds=0, stop_prob=1e-12)
    assert r.cost["steps"] == 3
    out = r.save(tmp_path / "ad")
    assert r.config["adapter"] == "keyed" and r.adapter_config["r"] == 3
    assert r.cost["trainable_params"] == 2 * 3 * u.model.config.hidden_size  # B only, two layers
    assert r.adapter_config["base_model_name_or_path"] == str(tiny_lm.resolve())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    lora.load_adapter(u.model, out)
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        ref = peft_model(ids).logits
        got = u.model(ids)
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    lora.detach(u.model)
    assert rel_err(got, ref) <= 1e-5
    assert rel_err(base, ref) > 1e-6  # the trained B moved the output


def test_an_adapter_peft_saved_with_rank_and_alpha_patterns_loads_and_matches(tmp_path):
    """PEFT's rank_pattern / alpha_pattern (regular expressions over module names) give each module its rank
    and alpha; lune_fast resolves them as PEFT does (a lifelong state writes them when its windows differ)."""
    import json

    from peft import LoraConfig, get_peft_model

    hf = make_tiny_hf("llama", tmp_path / "base").double()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"q_proj": 2, "layers.2.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3},
                     init_lora_weights=False)  # random B too: the adapter changes the output
    peft_model = get_peft_model(hf, cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "ad"))
    model = load_model(tmp_path / "base", dtype=torch.float64)
    loaded = lora.load_adapter(model, tmp_path / "ad")
    assert loaded.rank_of("layers.0.self_attn.q_proj") == 2 and loaded.rank_of("layers.2.mlp.down_proj") == 6
    assert loaded.rank_of("layers.1.mlp.down_proj") == 4 and loaded.scale_of("layers.1.self_attn.v_proj") == 3 / 4
    ids = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = peft_model(ids).logits, model(ids)
        with peft_model.disable_adapter():
            assert rel_err(peft_model(ids).logits, ref) > 1e-3
    assert rel_err(got, ref) <= 64 * 2 ** -24

    lora.detach(model)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "rank_pattern": {"q_proj": 2.5}}))
    with pytest.raises(lora.AdapterError, match=r"rank_pattern\['q_proj'\] must be a positive int, found 2.5"):
        lora.load_adapter(model, tmp_path / "ad")
    cfg_path.write_text(json.dumps({**good, "alpha_pattern": {"q_proj(": 2}}))
    with pytest.raises(lora.AdapterError, match=r"alpha_pattern key 'q_proj\(' is not a regular expression"):
        lora.load_adapter(model, tmp_path / "ad")
