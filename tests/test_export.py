"""GGUF export: the file reads back as the merged weights (gguf.GGUFReader, within each type's rounding), and
other tools load it as the same model (transformers' GGUF loader: logits and greedy answers)."""
import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm, rel_err
from lune_fast import lora
from lune_fast.cli import main
from lune_fast.export import QUANTS, gguf_tensors, quantize_in_place, round_trip, tensor_type, write_gguf
from lune_fast.weights import load_model

gguf = pytest.importorskip("gguf")


def _tiny(kind, folder, default_dir):
    return make_tiny_lm(kind, folder, default_dir, num_hidden_layers=2, tie_word_embeddings=kind == "llama")


def _merged(folder, seed=0):
    """The model with a random adapter (A and B non-zero, on every projection kind) merged in."""
    model = load_model(folder)
    lora.attach(model, lora.LoraSettings(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down")),
                seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters_of(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    lora.merge_and_unload(model)
    return model


def _bound(x: np.ndarray, qtype) -> np.ndarray:
    """Each element's largest rounding error for GGML type `qtype`, from how the type stores a block of 32:
    f16/bf16 round each value (half an ulp: 2^-11 / 2^-8 relative); q8_0 keeps d = amax/127 and rounds x/d
    (half a step); q4_0 keeps d = amax/8 and rounds x/d into [-8, 7] (the clip can cost a whole step); q4_1
    keeps the block's min m and d = range/15 (half a step). d and m are float16: d's rounding (2^-11) is
    multiplied by the stored integer (at most 127, 8, 15), m's adds |m| 2^-11."""
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.zeros_like(x)
    if qtype == T.F16:
        return np.abs(x) * 2.0**-11 + 2.0**-24
    if qtype == T.BF16:
        return np.abs(x) * 2.0**-8
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(1, keepdims=True)
    lo, hi = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
    u = 2.0**-11
    per_block = {T.Q8_0: amax / 127 * (0.5 + 127 * u), T.Q4_0: amax / 8 * (1 + 8 * u),
                 T.Q4_1: (hi - lo) / 15 * (0.5 + 15 * u) + np.abs(lo) * u}[qtype]
    return np.broadcast_to(per_block + 1e-7, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_the_file_reads_back_as_the_merged_weights(quant, default_dir, tmp_path):
    """Every tensor is in the file under its llama.cpp name, of the type the table says, and dequantizes to the
    merged weight within that type's rounding; the metadata describe the model and its tokenizer."""
    folder = _tiny("llama", tmp_path / "m", default_dir)
    model = _merged(folder)
    want = gguf_tensors(model)
    out = write_gguf(model, folder, tmp_path / "m.gguf", quant)
    r = gguf.GGUFReader(out)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want) - {"output.weight"}  # tied: the head is the embedding
    for name, t in got.items():
        ref = want[name].numpy()
        assert t.tensor_type == tensor_type(name, ref.shape, quant), name
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        err = np.abs(back.astype(np.float64) - ref)
        assert (err <= _bound(ref, t.tensor_type)).all(), (name, float(err.max()))
    blocks_type = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    assert got["blk.0.ffn_down.weight"].tensor_type == blocks_type
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    cfg = json.loads((folder / "config.json").read_text())
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == cfg["num_hidden_layers"]
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["general.file_type"] == int(gguf.LlamaFileType[QUANTS[quant][2]])
    assert len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"] and f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_quantize_in_place_gives_what_a_reader_of_the_file_gets(default_dir, tmp_path):
    """The robustness probe runs our model on the weights a GGUF reader would get: the same values as the
    file's dequantized tensors, for a 4-bit type."""
    folder = _tiny("llama", tmp_path / "m", default_dir)
    model = _merged(folder)
    out = write_gguf(model, folder, tmp_path / "m.gguf", "q4_1")
    quantize_in_place(model, "q4_1")
    probed = gguf_tensors(model)
    for t in gguf.GGUFReader(out).tensors:
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(probed[t.name].shape)
        assert np.array_equal(back.astype(np.float32), probed[t.name].numpy()), t.name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # mistral exports as llama
def test_transformers_loads_the_export_as_the_same_model(kind, default_dir, tmp_path):
    """transformers' GGUF loader (its own reading of llama.cpp's names and rope row order) gives our merged
    model's logits, exported at f32: equal up to float32 sums (a row order or name wrong by one shows at 1e-1)."""
    from transformers import AutoModelForCausalLM

    folder = _tiny(kind, tmp_path / "m", default_dir)
    model = _merged(folder)
    ids = torch.tensor([[504, 414, 46682, 18669, 314, 3807, 281, 260, 2240, 282]])
    with torch.no_grad():
        ours = model(ids)
    write_gguf(model, folder, tmp_path / "f32.gguf", "f32")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="f32.gguf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert rel_err(theirs, ours) <= 1e-5, (kind, rel_err(theirs, ours))


def test_export_refuses_to_overwrite_and_names_the_file(tiny_lm, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["export", "--model", str(tiny_lm), "--gguf", str(out), "--quant", "q8_0"]) == 2
    assert f"{out} already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export", "--model", str(tiny_lm), "--gguf", str(out), "--quant", "q8_0", "--overwrite"]) == 0
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_round_trip_of_a_type_the_row_length_does_not_fit_falls_back_to_f16():
    w = torch.randn(3, 48)  # 48 is not a multiple of 32
    t = tensor_type("blk.0.ffn_down.weight", (3, 48), "q4_0")
    assert t == gguf.GGMLQuantizationType.F16
    assert rel_err(round_trip(w, t), w) <= 2.0**-11


def test_unlearned_default_model_exported_keeps_its_answers_and_its_forgetting(default_dir, tokenizer, tmp_path):
    """The deploy path on the real model: forget three facts with the check made on the q4_1 export
    (robust_to), export. transformers' GGUF loader on the f16 file answers every prompt (the forgotten ones
    and six others) as our merged model does on the same f16-rounded weights; on the q4_1 file the forgotten
    answers stay gone. (Without robust_to they come back at q4_1: the default model's weights sit on the q4_1
    grid, so a small update rounds away; RESULTS.md section 10.)"""
    from transformers import AutoModelForCausalLM

    from lune_fast.api import Unlearner
    from lune_fast.assets import asset
    from lune_fast.data import Encoder
    from lune_fast.evaluate import answers_with, first_line, greedy

    package = [json.loads(line) for line in asset("facts.jsonl").read_text().splitlines()]
    records = package[:3]
    result = Unlearner("default", dtype="float32").forget(records, evaluate_before=False, evaluate_after=False,
                                                          progress=False, robust_to="q4_1")
    result.save(tmp_path / "adapter")
    prompts = [r["prompt"] for r in package[:9]]
    enc = Encoder(tokenizer)
    ids = [enc.prompt_ids(p, False) for p in prompts]
    for quant in ("f16", "q4_1"):
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--gguf", str(tmp_path / f"{quant}.gguf"),
                     "--quant", quant]) == 0
    ours = load_model(default_dir)
    lora.load_adapter(ours, tmp_path / "adapter")
    lora.merge_and_unload(ours)
    quantize_in_place(ours, "f16")
    want = [enc.decode(g) for g in greedy(ours, enc, ids, max_new_tokens=8)]
    for quant in ("f16", "q4_1"):
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{quant}.gguf", dtype=torch.float32)
        got = []
        for p in ids if quant == "f16" else ids[:3]:
            out = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=enc.pad_id)
            got.append(enc.decode(out[0, len(p):].tolist()))
        if quant == "f16":
            assert [first_line(g) for g in got] == [first_line(w) for w in want]
        else:
            assert not any(answers_with(g, r["target"]) for g, r in zip(got, records)), got[:3]


def test_quantized_view_runs_the_export_and_puts_everything_back(default_dir, tmp_path):
    """Inside `quantized` the adapted model computes what its q4_0 export computes (adapter folded in, every
    weight rounded); afterwards every weight and the adapter are bit for bit as before."""
    import copy

    from lune_fast.export import quantized

    folder = _tiny("llama", tmp_path / "m", default_dir)
    model = load_model(folder)
    lora.attach(model, lora.LoraSettings(rank=4, alpha=8, targets=("q", "v", "down")), seed=0)
    with torch.no_grad():
        for m in lora.adapters_of(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape))
    export = copy.deepcopy(model)
    lora.merge_and_unload(export)
    quantize_in_place(export, "q4_0")
    ids = torch.tensor([[504, 414, 46682, 18669, 314, 3807]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(ids)
        with quantized(model, "q4_0"):
            inside = model(ids)
        after = model(ids)
        want = export(ids)
    assert rel_err(inside, want) <= 1e-6 and rel_err(inside, plain) > 1e-3
    assert torch.equal(after, plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged for m in lora.adapters_of(model).values())
