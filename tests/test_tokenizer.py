"""lune_fast.tokenizer against transformers' AutoTokenizer (the oracle) on the embedded models' folders: ids with
and without special tokens, character offsets, decoding, special tokens, the chat template; folders it cannot
read as transformers does go to transformers."""
import json
import shutil
import subprocess
import sys

import pytest

from lune_fast.tokenizer import Tokenizer, load
from lune_fast.weights import WeightsError, resolve_model_dir

TEXTS = ["The capital of France is", " Paris", "héllo wörld — “quotes” 東京 🙂", "a\nb\n\nc  d\t e", "",
         "<|im_start|>user\nhi<|im_end|>", "<bos>x<eos><pad>", "   leading spaces", "numbers 1234567 3.14",
         "Who wrote 'Pride and Prejudice'?"]
CHATS = [[{"role": "user", "content": "What is the capital of Kenya?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a river."}]]


def _folder(name):
    try:
        return resolve_model_dir(name)
    except WeightsError as e:
        pytest.skip(f"{name} cannot be installed here: {e}")


@pytest.fixture(scope="module", params=["default", "gemma3-270m"])
def pair(request):
    from transformers import AutoTokenizer

    folder = _folder(request.param)
    ours = Tokenizer.from_folder(folder)
    assert ours is not None, f"{folder} should be read without transformers"
    return ours, AutoTokenizer.from_pretrained(str(folder))


def test_ids_and_offsets_are_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            a = ours(text, add_special_tokens=special, return_offsets_mapping=True)
            b = hf(text, add_special_tokens=special, return_offsets_mapping=True)
            assert a.input_ids == b.input_ids and a["input_ids"] == b["input_ids"], (text, special)
            assert a.offset_mapping == [tuple(o) for o in b["offset_mapping"]], (text, special)
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)


def test_decoding_and_special_tokens_are_transformers(pair):
    ours, hf = pair
    assert len(ours) == len(hf)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
        assert getattr(ours, f"{name}_token") == getattr(hf, f"{name}_token"), name
    singles = [[i] for i in range(0, len(hf), 7)]
    assert ours.batch_decode(singles) == hf.batch_decode(singles)
    ids = [i for s in singles[::50] for i in s] + [hf.eos_token_id, hf.pad_token_id]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_chat_template_renders_as_transformers(pair):
    ours, hf = pair
    if hf.chat_template is None:
        assert ours.chat_template is None
        with pytest.raises(ValueError, match="no chat template"):
            ours.apply_chat_template(CHATS[0])
        return
    for chat in CHATS:
        for gen in (True, False):
            want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == want
            assert ours.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen) == \
                hf(want, add_special_tokens=False).input_ids


@pytest.mark.parametrize("change", [{"add_bos_token": True}, {"clean_up_tokenization_spaces": True},
                                    {"tokenizer_class": "LlamaTokenizerFast"}, "special_tokens_map"])
def test_a_folder_transformers_would_read_otherwise_goes_to_transformers(default_dir, tmp_path, change):
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_dir / f, tmp_path / f)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert Tokenizer.from_folder(tmp_path) is not None
    if change == "special_tokens_map":  # disagrees with the config
        (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    else:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    assert Tokenizer.from_folder(tmp_path) is None
    assert type(load(tmp_path)).__module__.startswith("transformers")


def test_an_unlearner_never_imports_transformers(default_dir):
    """Loading the default model and its tokenizer (what every `lune-fast unlearn` process does) leaves
    transformers unimported."""
    code = ("import sys\nfrom lune_fast.api import Unlearner\nu = Unlearner()\n"
            "print(type(u.tokenizer).__name__, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Tokenizer", "False"]
