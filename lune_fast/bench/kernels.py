"""Both kernel families on one model's shapes: the LoRA linear (bench lora) and the fused head log-prob
(bench logprob), on whatever device is present.

    lune-fast bench kernels [--shapes llama-3-8b|llama-3.2-1b|default|CONFIG.json] [--n 512,2048,8192]
                            [--r 8,16,64] [--dtype bfloat16] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .harness import write_json
from . import logprob, lora


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lune-fast bench kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="default")
    ap.add_argument("--n", default="512,2048")
    ap.add_argument("--r", default="16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    cfg = lora.model_shapes(a.shapes)
    with tempfile.TemporaryDirectory() as tmp:
        lj, pj = Path(tmp) / "lora.json", Path(tmp) / "logprob.json"
        lora.main(["--shapes", a.shapes, "--n", a.n, "--r", a.r, "--dtype", a.dtype, "--repeats", str(a.repeats),
                   "--json", str(lj)])
        logprob.main(["--hidden", str(cfg["hidden_size"]), "--vocab", str(cfg["vocab_size"]), "--n", a.n,
                      "--dtype", a.dtype, "--repeats", str(a.repeats), "--json", str(pj)])
        if a.json:
            write_json(a.json, {"lora": json.loads(lj.read_text()), "logprob": json.loads(pj.read_text())})
    return 0
