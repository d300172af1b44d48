"""Deployment checked by llama.cpp itself (opt-in: `make test-llamacpp` builds llama-server from a pinned source
and runs these; `make test` leaves them out). The validation set's first 32 facts forgotten at once with the
defaults, then served by llama-server:
- the GGUF LoRA adapter over the shipped Q4_1 base and over a Q8_0 base: forgotten (<= 0.05), the base's
  neighbours kept as our own evaluation keeps them; turned off live (POST /lora-adapters, scale 0) the base answers
  exactly as before;
- the adapter merged into q4_1 and q4_0 exports, over the whole validation set (five batches of 32, each forgotten
  at once, pooled): forgotten (<= 0.05), >= 0.9 of the neighbours of the base exported alike;
- Gemma 3 270M's merged f32 export gives our greedy answers on 20 prompts.
About 22 minutes on 2 cores."""
import pytest

from lune_fast.bench import llamacpp

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    binary = llamacpp.default_server()
    if not binary.exists():
        pytest.skip(f"no llama-server at {binary}: `make test-llamacpp` builds it")
    return llamacpp.run(binary, None, 32, 20, tmp_path_factory.mktemp("llamacpp"))


@pytest.fixture(scope="module")
def merged_pooled(tmp_path_factory):
    binary = llamacpp.default_server()
    if not binary.exists():
        pytest.skip(f"no llama-server at {binary}: `make test-llamacpp` builds it")
    return llamacpp.run(binary, None, 32, 0, tmp_path_factory.mktemp("merged"), only="merged", batches=5)["pooled"]


def _row(measured, base, deployed):
    return next(r for r in measured["rows"] if r["base"] == base and r["deployed"] == deployed)


@pytest.mark.parametrize("base", ["Q4_1 (shipped)", "Q8_0 (export)"])
def test_adapter_over_a_quantized_base(measured, base):
    """Forgotten, and the neighbours kept as our own full-precision evaluation keeps them (within 0.05: a
    neighbour or two of ~40 the quantized base answers); the issue's bar of 0.95 is the method's (ours: 0.95),
    reported in RESULTS.md section 10, not a property of the deployment."""
    r = _row(measured, base, "adapter (--lora)")
    assert r["base_forget"] >= 0.9  # the base alone knows them
    assert r["forget"] <= 0.05, r
    assert r["neighbours_kept"] >= min(0.95, measured["ours_full_precision"][0]["neighbor"]) - 0.05, r
    assert r["scale0_again_same"]  # scale 0: every answer as the base alone gave it


@pytest.mark.parametrize("quant", ["q4_1", "q4_0"])
def test_merged_four_bit_exports(merged_pooled, quant):
    """Pooled over the validation set: one batch of 32 holds 20-30 neighbours the 4-bit base answers, so a
    single batch's share moves by 0.04 a neighbour."""
    r = next(r for r in merged_pooled if r["base"] == f"{quant} export")
    assert r["batches"] == 5 and r["forget"] <= 0.05 and r["neighbours_kept"] >= 0.9, r


def test_gemma3_export_runs_in_llama_cpp_as_ours(measured):
    g = measured["gemma"]
    assert g["same_greedy_answer"] == g["prompts"] == 20, g["differ"]
