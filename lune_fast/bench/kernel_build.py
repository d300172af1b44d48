"""The Triton LoRA kernels compiled for real GPUs without one: PTX, SASS and resource usage per config
(tests/test_gpu_build.py reads this report; benchmarks/results/triton_compile_report.json keeps one).

    python -m lune_fast.bench.kernel_build > report.json
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton

from ..kernels import lora_linear as K


def compile_for(kind: str, cap: int, config: tuple, dtype: str = "bf16", rank: int = 16, has_bias: bool = False):
    """triton.compile the fwd/bwd kernel for CUDA capability `cap` (80, 90) at one config (an entry of
    CONFIGS[(family, kind)]), no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    BM, BN, BK, warps, stages = config[:5]
    p = f"*{dtype}"
    if kind == "fwd":
        sig = {"x_ptr": p, "w_ptr": p, "a_ptr": p, "b_ptr": p, "bias_ptr": p, "y_ptr": p, "xa_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32", "R": "i32", "M_BUCKET": "i32", "HAS_BIAS": "constexpr",
               "UPCAST": "constexpr", "RP": "constexpr", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr",
               "GROUP_M": "constexpr", "MAX_RP": "constexpr"}
        consts = {"HAS_BIAS": has_bias, "UPCAST": False, "RP": K.rank_pad(rank), "BM": BM, "BN": BN, "BK": BK,
                  "GROUP_M": 8, "MAX_RP": 64}
        fn = K._fwd_kernel
    else:
        sig = {"dy_ptr": p, "w_ptr": p, "a_ptr": p, "b_ptr": p, "x_ptr": p, "xa_ptr": "*fp32", "dx_ptr": p,
               "pa_ptr": "*fp32", "pb_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
               "M_BUCKET": "i32", "UPCAST": "constexpr", "RP": "constexpr", "BM": "constexpr", "BN": "constexpr",
               "BK": "constexpr", "GROUP_M": "constexpr", "MAX_RP": "constexpr"}
        # a backward config is (BM, dx tile width, reduction chunk) = (BM, BK, BN) of the kernel
        consts = {"UPCAST": False, "RP": K.rank_pad(rank), "BM": BM, "BN": BK, "BK": BN, "GROUP_M": 8, "MAX_RP": 64}
        fn = K._bwd_kernel
    # What the JIT would specialise at a real launch: 16-byte aligned pointers, and N, K (row strides) and r
    # divisible by 16 where they are. Without these hints no load can become an async copy.
    names = list(sig)
    aligned = [i for i, n in enumerate(names) if sig[n].startswith("*") or n in ("N", "K") or (n == "R" and rank % 16 == 0)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def compile_report(families=("hopper", "ampere")) -> list[dict]:
    """Compile every kernel at every config (at the largest rank it admits) for its chip and read off what
    matters: wgmma in the PTX and HGMMA in the SASS (Hopper), shared memory, registers, stack (spills)."""
    rows = []
    for family in families:
        cap = 90 if family == "hopper" else 80
        for kind in ("fwd", "bwd"):
            for cfg in K.CONFIGS[(family, kind)]:
                c = compile_for(kind, cap, cfg, rank=cfg[5])
                res = _cuobjdump(c.asm["cubin"], "-res-usage")
                reg, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", res).groups())
                rows.append({"family": family, "kind": kind, "config": list(cfg), "cap": cap,
                             "wgmma_ptx": "wgmma" in c.asm["ptx"],
                             "hgmma_sass": "HGMMA" in _cuobjdump(c.asm["cubin"], "-sass"),
                             "shared_bytes": c.metadata.shared, "registers": reg, "stack_bytes": stack})
    return rows


if __name__ == "__main__":
    print(json.dumps(compile_report()))
