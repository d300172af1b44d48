"""Regenerate lune_fast/assets/preserve_text.jsonl: the sentences of tools/preserve_seeds.txt (written for this
project; a "Q:" line and the "A:" line after it make one text), each followed by the default model's own greedy
continuation, and with --samples K also K sampled continuations of each. Keyed adapters are whitened against the
activations of this text: the model's own continuations give ordinary text in its own distribution from a few
dozen lines, as many tokens as the covariance of a 1,536-wide input needs.

    python tools/make_preserve_text.py                          # the default model -> the package's file
    python tools/make_preserve_text.py --samples 15 --new-tokens 64 --out lune_fast/assets/preserve_text_long.jsonl
    python tools/make_preserve_text.py --model gemma3-270m --out FILE

The second is the long text (~60,000 tokens, 864 texts; keyed replace mode's default, lune_fast.keyed.PACKAGE_TEXTS);
sampled continuations depend on the machine's rounding, so a rerun elsewhere gives another text of the same kind.
"""
import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from lune_fast.api import Unlearner, asset
from lune_fast.generate import generate


def seeds() -> list[str]:
    lines = [ln for ln in (Path(__file__).parent / "preserve_seeds.txt").read_text().splitlines() if ln.strip()]
    out, i = [], 0
    while i < len(lines):
        take = 2 if lines[i].startswith("Q:") else 1
        out.append("\n".join(lines[i:i + take]))
        i += take
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", help="default: the package's assets/preserve_text.jsonl")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens of each continuation")
    ap.add_argument("--samples", type=int, default=0, help="sampled continuations of each seed, besides the greedy one")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    u = Unlearner(a.model)
    texts = seeds()
    ids = [u.tokenizer(t)["input_ids"] for t in texts]
    eos, pad = u.model.config.eos_token_id, u.encoder.pad_id
    rows = list(zip(texts, generate(u.model, ids, a.new_tokens, eos_token_id=eos, pad_token_id=pad)))
    draws = torch.Generator().manual_seed(a.seed)
    for _ in tqdm(range(a.samples), desc="samples", disable=not a.samples):
        gens = generate(u.model, ids, a.new_tokens, eos_token_id=eos, pad_token_id=pad, temperature=a.temperature,
                        generator=draws)
        rows += zip(texts, gens)
    path = Path(a.out) if a.out else asset("preserve_text.jsonl")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t + u.encoder.decode(g)}) + "\n" for t, g in rows))
    tmp.replace(path)
    print(f"wrote {len(rows)} texts to {path}")


if __name__ == "__main__":
    main()
