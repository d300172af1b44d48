"""The tokenizer at run time: the `tokenizers` library on a model folder's tokenizer.json, with the special tokens
and chat template of its tokenizer_config.json — what transformers' fast tokenizer does for such a folder,
without importing transformers (0.6-2.3 s) or building its tokenizer class (0.6-2 s) in every process.

A folder is read this way only where its tokenizer class is one whose ids come from tokenizer.json alone and its
config sets nothing that transformers applies on top (BOS/EOS switches, space clean-up, a second special-tokens
file that disagrees); any other folder gets transformers' AutoTokenizer, as before. transformers stays the
oracle: tests compare ids, offsets, decoding, special tokens and the rendered chat template on the embedded
models.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

# tokenizer classes whose ids, offsets and decoding are tokenizer.json's own (checked against transformers on the
# embedded SmolLM2 and Gemma 3 folders: tests/test_tokenizer.py)
PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast", "GemmaTokenizer", "GemmaTokenizerFast"}
# config keys through which transformers changes what tokenizer.json says
APPLIED_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "clean_up_tokenization_spaces")
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class Encoded(dict):
    """input_ids (and offset_mapping when asked), by key or attribute as transformers' BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


class Tokenizer:
    """The parts of transformers' tokenizer interface the package uses: calling it on a text (input_ids, with
    return_offsets_mapping the character offsets), encode, decode / batch_decode, len(), the special tokens and
    their ids, apply_chat_template(..., tokenize=False)."""

    def __init__(self, backend, special: dict[str, str], chat_template: str | None):
        self.backend = backend
        self.chat_template = chat_template
        for name in SPECIAL:
            token = special.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", backend.token_to_id(token) if token is not None else None)
        self._template = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer | None":
        """The folder's tokenizer read directly, or None where transformers is needed to read it as it would."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            return None
        config = _json(folder / "tokenizer_config.json")
        if config.get("tokenizer_class") not in PLAIN_CLASSES or any(config.get(k) for k in APPLIED_KEYS):
            return None
        special = {k: _content(config[k]) for k in SPECIAL if config.get(k) is not None}
        extra = _json(folder / "special_tokens_map.json")
        for k in SPECIAL:
            if extra.get(k) is not None:
                if k in special and special[k] != _content(extra[k]):
                    return None
                special[k] = _content(extra[k])
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and (not isinstance(template, str)  # named templates: transformers chooses
                                     or re.search(r"{%-?\s*generation", template)):  # its own jinja tag
            return None
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception:  # a format this tokenizers cannot read: transformers may convert it
            return None
        return cls(backend, special, template)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> Encoded:
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        out = Encoded(input_ids=list(enc.ids))
        if return_offsets_mapping:
            out["offset_mapping"] = [tuple(o) for o in enc.offsets]
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens).input_ids

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(s) for s in seqs], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False):
        """The conversation rendered as transformers renders it (a sandboxed jinja2 environment with blocks
        trimmed, loop controls, raise_exception, strftime_now and the special tokens as variables); with
        tokenize, its ids (no special tokens added: the template holds them)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{k: getattr(self, k) for k in SPECIAL if getattr(self, k) is not None})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def load(folder: str | Path):
    """The folder's tokenizer: ours where it reads the folder as transformers does, else transformers'."""
    tok = Tokenizer.from_folder(folder)
    if tok is not None:
        return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
