"""Forget-set readers (facts JSONL, TOFU QA, CounterFact in ROME's and EasyEdit's shapes), tokenization and
batching.

Every reader reports unusable records with file, line and reason and keeps the rest; a file with no usable
record is one clear DataError.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import AttnMask

MAX_TEXT_CHARS = 20_000  # longer prompts or answers are refused up front, not discovered by the tokenizer


class DataError(ValueError):
    """A forget/retain file (or record list) that cannot be used."""


class RecordError(ValueError):
    """One unusable record; the message is the reason."""


@dataclass
class Fact:
    prompt: str
    target: str
    replacement: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighbors: list[tuple[str, str]] = field(default_factory=list)
    chat: bool = False  # the prompt is a question for the chat template (TOFU)
    source: str = ""
    subject: str | None = None  # where known (CounterFact): anchors swap it for other subjects
    # paraphrases that describe the subject instead of naming it ({"prompt", "names_subject": false}): out of
    # reach of anything keyed on the subject's tokens, so they are measured on their own
    indirect: list[str] = field(default_factory=list)


def listed_neighbors(facts: list[Fact], forgotten: list[Fact] | tuple = ()) -> list[tuple[Fact, str, str]]:
    """(fact, prompt, answer) of every neighbour the facts list, in order and with repeats, leaving out those that
    are forget prompts of `facts` or `forgotten` themselves (a request may list another of its facts)."""
    forget = {f.prompt for f in [*facts, *forgotten]}
    return [(f, p, t) for f in facts for p, t in f.neighbors if p not in forget]


@dataclass
class ReadResult:
    facts: list[Fact]
    skipped: list[str]  # "file:line: reason"


def _text(obj: dict, key: str, required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise RecordError(f"field {key!r} is missing")
        return None
    if not isinstance(v, str):
        raise RecordError(f"field {key!r} must be a string, found {type(v).__name__}")
    if not v.strip():
        if required:
            raise RecordError(f"field {key!r} is empty")
        return None
    if len(v) > MAX_TEXT_CHARS:
        raise RecordError(f"field {key!r} is {len(v):,} characters; the limit is {MAX_TEXT_CHARS:,}")
    return v


def _str_list(obj: dict, key: str, item_key: str = "prompt") -> list[str]:
    v = obj.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise RecordError(f"field {key!r} must be a list, found {type(v).__name__}")
    out = []
    for i, item in enumerate(v):
        if isinstance(item, dict):
            item = _text(item, item_key) if item_key in item else None
            if item is None:
                raise RecordError(f"{key}[{i}] has no {item_key!r}")
        if not isinstance(item, str) or not item.strip():
            raise RecordError(f"{key}[{i}] must be a non-empty string")
        if len(item) > MAX_TEXT_CHARS:
            raise RecordError(f"{key}[{i}] is {len(item):,} characters; the limit is {MAX_TEXT_CHARS:,}")
        out.append(item)
    return out


def _paraphrases(obj: dict) -> tuple[list[str], list[str]]:
    """(paraphrases that name the subject, those marked "names_subject": false)."""
    prompts = _str_list(obj, "paraphrases")
    raw = obj["paraphrases"] if isinstance(obj.get("paraphrases"), list) else prompts
    indirect = [isinstance(item, dict) and item.get("names_subject") is False for item in raw]
    return [p for p, x in zip(prompts, indirect) if not x], [p for p, x in zip(prompts, indirect) if x]


def _neighbors(obj: dict) -> list[tuple[str, str]]:
    v = obj.get("neighbors")
    if v is None:
        return []
    if not isinstance(v, list):
        raise RecordError(f"field 'neighbors' must be a list, found {type(v).__name__}")
    out = []
    for i, n in enumerate(v):
        if not isinstance(n, dict):
            raise RecordError(f"neighbors[{i}] must be an object with 'prompt' and 'target'")
        try:
            out.append((_text(n, "prompt"), _text(n, "target")))
        except RecordError as e:
            raise RecordError(f"neighbors[{i}]: {e}") from None
    return out


def parse_record(obj, source: str = "") -> Fact:
    """One record in any of the accepted shapes -> Fact (raises RecordError with the reason)."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, found {type(obj).__name__}")
    if "requested_rewrite" in obj:  # CounterFact as ROME ships it
        rw = obj["requested_rewrite"]
        if not isinstance(rw, dict):
            raise RecordError("field 'requested_rewrite' must be an object")
        tmpl, subject = _text(rw, "prompt"), _text(rw, "subject")
        if "{}" not in tmpl:
            raise RecordError("requested_rewrite.prompt has no '{}' for the subject")
        true, new = rw.get("target_true"), rw.get("target_new")
        if not isinstance(true, dict) or not isinstance(new, dict):
            raise RecordError("requested_rewrite needs target_true and target_new objects with 'str'")
        target = _text(true, "str")
        return Fact(prompt=tmpl.replace("{}", subject), target=target, replacement=_text(new, "str"),
                    paraphrases=_str_list(obj, "paraphrase_prompts"),
                    neighbors=[(p, target) for p in _str_list(obj, "neighborhood_prompts")], source=source,
                    subject=subject)
    if "question" in obj or "answer" in obj:  # TOFU QA through the chat template
        perturbed = _str_list(obj, "perturbed_answer")
        para = _text(obj, "paraphrased_question", required=False)
        return Fact(prompt=_text(obj, "question"), target=_text(obj, "answer"),
                    replacement=perturbed[0] if perturbed else None, paraphrases=[para] if para else [],
                    chat=True, source=source)
    if "ground_truth" in obj or "target_new" in obj:  # CounterFact in EasyEdit's flat shape
        loc_p = _text(obj, "locality_prompt", required=False)
        loc_t = obj.get("locality_ground_truth")
        if isinstance(loc_t, list):
            loc_t = loc_t[0] if loc_t and isinstance(loc_t[0], str) else None
        neighbors = [(loc_p, loc_t)] if loc_p and isinstance(loc_t, str) and loc_t.strip() else []
        new = obj.get("target_new")
        new = new.get("str") if isinstance(new, dict) else new
        if new is not None and not isinstance(new, str):
            raise RecordError("field 'target_new' must be a string")
        para = _text(obj, "rephrase_prompt", required=False)
        return Fact(prompt=_text(obj, "prompt"), target=_text(obj, "ground_truth"), replacement=new or None,
                    paraphrases=[para] if para else [], neighbors=neighbors, source=source,
                    subject=_text(obj, "subject", required=False))
    if "prompt" in obj or "target" in obj:
        named, indirect = _paraphrases(obj)
        return Fact(prompt=_text(obj, "prompt"), target=_text(obj, "target"),
                    replacement=_text(obj, "replacement", required=False), paraphrases=named,
                    neighbors=_neighbors(obj), source=source, subject=_text(obj, "subject", required=False),
                    indirect=indirect)
    keys = ", ".join(sorted(obj)[:6]) or "none"
    raise RecordError(f"unrecognised record (fields: {keys}); expected prompt/target, question/answer, "
                      f"requested_rewrite, or prompt/ground_truth/target_new")


def _json_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed object) for a JSONL file, or for a JSON array (line of each element's start)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON array ({e.msg}, column {e.colno})") from None
        if not isinstance(arr, list):
            raise DataError(f"{path}: expected a JSON array or JSON lines")
        return [(i + 1, item) for i, item in enumerate(arr)]  # element index: arrays rarely keep one per line
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, RecordError(f"invalid JSON ({e.msg}, column {e.colno})")))
    return out


def read_facts(source, limit: int | None = None) -> ReadResult:
    """A path (JSONL or JSON array) or a list of dicts -> usable facts plus the skipped records' reasons."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        items = _json_lines(path)
        label = str(path)
        kind = "line" if not path.read_bytes().lstrip().startswith(b"[") else "record"
    elif isinstance(source, dict):
        items, label, kind = [(1, source)], "records", "record"
    else:
        try:
            items = [(i + 1, r) for i, r in enumerate(source)]
        except TypeError:
            raise DataError(f"records must be a path or a list of dicts, got {type(source).__name__}") from None
        label, kind = "records", "record"
    facts, skipped = [], []
    for n, obj in items:
        where = f"{label}:{n}" if kind == "line" else f"{label}[{n - 1}]"
        try:
            if isinstance(obj, RecordError):
                raise obj
            facts.append(parse_record(obj, where))
        except RecordError as e:
            skipped.append(f"{where}: {e}")
    if not facts:
        if not items:
            raise DataError(f"{label}: no records")
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise DataError(f"{label}: no usable records ({shown})")
    if limit is not None:
        facts = facts[:limit]
    return ReadResult(facts, skipped)


def read_lines(path, key: str | None = None) -> list[str]:
    """Plain strings from a .txt (one per line) or JSONL file ({"text": ...} or bare strings)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".txt":
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for n, obj in _json_lines(path):
        if isinstance(obj, str):
            out.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get(key or "text"), str):
            out.append(obj[key or "text"])
        else:
            raise DataError(f"{path}:{n}: expected a string or an object with {key or 'text'!r}")
    if not out:
        raise DataError(f"{path}: no lines")
    return out


# -- tokenization -------------------------------------------------------------------------------------------
class Encoder:
    """Prompt and answer tokenized separately, the answer as it follows the prompt (a leading space after
    a completion prompt; none after a chat template's assistant header or a prompt ending in whitespace)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._line_stop = None
        self.memo: dict = {}  # what is found about prompts through this tokenizer (subjects._subject_span)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def line_stop(self, vocab: int, device):
        """What generate() needs to stop at the end of the first non-empty line (built once, ~0.4 s)."""
        from .generate import LineStop

        if self._line_stop is None or self._line_stop.newline.device != torch.device(device):
            texts = self.tok.batch_decode([[i] for i in range(len(self.tok))])
            self._line_stop = LineStop.from_texts(texts, vocab, device)
        return self._line_stop

    def prompt_text(self, prompt: str, chat: bool) -> str:
        if chat:
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return prompt

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            return self.tok(self.prompt_text(prompt, True), add_special_tokens=False).input_ids
        return self.tok(prompt).input_ids

    def answer_ids(self, prompt: str, answer: str, chat: bool) -> list[int]:
        lead = "" if chat or prompt[-1:].isspace() else " "
        return self.tok(lead + answer.strip(), add_special_tokens=False).input_ids

    def pair(self, prompt: str, answer: str, chat: bool) -> tuple[list[int], list[int]]:
        return self.prompt_ids(prompt, chat), self.answer_ids(prompt, answer, chat)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@dataclass
class Batch:
    """Sequences laid out in rows and where the answers are.

    Unpacked: one right-padded sequence per row (causal attention is exact for real tokens). Packed: several
    sequences per row, `positions` restarting at 0 for each and `segments` holding each token's sequence
    id (-1 for padding), for block-diagonal attention — padding then costs almost nothing.
    sel: flat indices into rows*T of the positions whose next token is an answer token; targets: those
    answer tokens; seq: which sequence each belongs to.
    """
    input_ids: torch.Tensor
    sel: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    n_seq: int
    n_tokens: int  # real (non-pad) tokens
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    pairs: list | None = None  # the (prompt, answer) ids it was built from, to rebuild a subset
    pad_id: int = 0
    pack: int | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.sel), move(self.targets), move(self.seq), self.n_seq,
                     self.n_tokens, move(self.positions), move(self.segments), self.pairs, self.pad_id, self.pack)

    def subset(self, keep: list[int]) -> "Batch":
        """The same layout rebuilt from the sequences `keep` (indices into this batch's sequences)."""
        return make_batch([self.pairs[i] for i in keep], self.pad_id, self.pack)

    def layout(self) -> tuple[torch.Tensor, AttnMask]:
        """Positions and attention mask of the rows: causal over right-padded rows, or block-diagonal when
        packed."""
        if self.segments is not None:
            return self.positions, AttnMask.packed(self.segments)
        B, T = self.input_ids.shape
        return torch.arange(T, device=self.input_ids.device).expand(B, T), AttnMask()


def make_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int = 0, pack: int | None = None) -> Batch:
    """(prompt ids, answer ids) pairs -> Batch. The last answer token is never an input. With `pack`,
    sequences are packed first-fit (longest first) into rows of max(pack, longest) tokens, cut to what the
    fullest row holds (rounded up to 8)."""
    seqs = []
    for p, a in pairs:
        if not p or not a:
            raise DataError("a prompt or an answer tokenized to nothing")
        seqs.append(((p + a)[:-1], len(p), a))
    longest = max(len(s[0]) for s in seqs)
    if pack is None:
        rows = [[i] for i in range(len(seqs))]
        T = longest
    else:
        T = max(pack, longest)
        rows, room = [], []
        for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
            n = len(seqs[i][0])
            r = next((j for j, free in enumerate(room) if free >= n), None)
            if r is None:
                rows.append([])
                room.append(T)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= n
        # rows as long as the fullest one needs (to a multiple of 8): a request of one fact fills a sixth of 64
        T = min(T, -(-max(T - free for free in room) // 8) * 8)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    sel, targets, seq = [], [], []
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            full, n_prompt, answer = seqs[i]
            ids[r, off:off + len(full)] = torch.tensor(full)
            positions[r, off:off + len(full)] = torch.arange(len(full))
            segments[r, off:off + len(full)] = i
            for j, tok in enumerate(answer):
                sel.append(r * T + off + n_prompt - 1 + j)
                targets.append(tok)
                seq.append(i)
            off += len(full)
    n_tokens = sum(len(s[0]) for s in seqs)
    layout = (positions, segments) if pack is not None else (None, None)
    return Batch(ids, torch.tensor(sel), torch.tensor(targets), torch.tensor(seq), len(seqs), n_tokens, *layout,
                 list(pairs), pad_id, pack)
