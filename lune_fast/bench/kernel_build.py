"""The Triton LoRA kernels compiled for real GPUs without one: PTX, SASS and resource usage per kernel and
config (tests/test_gpu_build.py reads this report; benchmarks/results/triton_compile_report.json keeps one).

    python -m lune_fast.bench.kernel_build > report.json

For the two GEMMs on Hopper it also reads the main loop off the PTX: whether its operands come through TMA
(cp.async.bulk.tensor) and whether its wgmma stay asynchronous (the loop waits for all but the newest group,
never for zero: a dot made synchronous inside the loop is what made the first kernels slow).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton

from ..kernels import lora_linear as L
from ..kernels import tma_gemm as G

CAP = {"hopper": 90, "ampere": 80}
# the GEMM's two layouts in the LoRA op, and the plain product bench lora holds against cuBLAS
GEMMS = {"fwd": dict(TRANS_B=True, TRANS_Q=True, HAS_LOWRANK=True),
         "dx": dict(TRANS_B=False, TRANS_Q=False, HAS_LOWRANK=True),
         "plain": dict(TRANS_B=True, TRANS_Q=True, HAS_LOWRANK=False)}


def _compile(fn, sig: dict, consts: dict, cap: int, warps: int, stages: int):
    """triton.compile for CUDA capability `cap`, no GPU needed. Pointers and the row lengths are marked
    16-byte divisible, as the JIT specialises them at a real launch of the Llama shapes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(sig, **{k: "constexpr" for k in consts})
    names = list(sig)
    aligned = [i for i, n in enumerate(names) if sig[n].startswith("*") or n in ("N", "K")]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", cap, 128 if cap >= 90 else 32),
                          options={"num_warps": warps, "num_stages": stages})


def compile_gemm(layout: str, cap: int, config: tuple, rp: int = 16, dtype: str = "bf16"):
    BM, BN, BK, warps, stages, persistent, flatten, ws = config
    p = f"*{dtype}"
    sig = {"a_ptr": p, "b_ptr": p, "p_ptr": "*fp32", "q_ptr": p, "bias_ptr": p, "c_ptr": p, "M": "i32", "N": "i32",
           "K": "i32", "M_BUCKET": "i32", "NUM_SMS": "i32"}
    consts = dict(GEMMS[layout], HAS_BIAS=False, UPCAST=False, RP=rp, BM=BM, BN=BN, BK=BK, GROUP_M=8,
                  PERSISTENT=persistent, FLATTEN=flatten, WARP_SPEC=ws)
    return _compile(G.gemm_kernel, sig, consts, cap, warps, stages)


def compile_small(kind: str, cap: int, config: tuple, rp: int = 16, dtype: str = "bf16"):
    p = f"*{dtype}"
    if kind == "shrink":
        BM, BK, warps, stages = config
        sig = {"x_ptr": p, "a_ptr": p, "s_ptr": "*fp32", "M": "i32", "K": "i32"}
        return _compile(L.shrink_kernel, sig, dict(UPCAST=False, RP=rp, BM=BM, BK=BK), cap, warps, stages)
    if kind == "dy":
        BM, BN, warps, stages = config
        sig = {"dy_ptr": p, "b_ptr": p, "s_ptr": "*fp32", "ds_ptr": "*fp32", "g_ptr": "*fp32", "M": "i32", "N": "i32"}
        return _compile(L.dy_kernel, sig, dict(UPCAST=False, ATOMIC=True, RP=rp, BM=BM, BN=BN), cap, warps, stages)
    BM, BK, warps, stages, rows = config
    sig = {"ds_ptr": "*fp32", "x_ptr": p, "pa_ptr": "*fp32", "M": "i32", "K": "i32"}
    return _compile(L.ds_x_kernel, sig, dict(UPCAST=False, RP=rp, BM=BM, BK=BK, ROWS=rows), cap, warps, stages)


def _blocks(ptx: str) -> list[dict]:
    """PTX cut into basic blocks, each with the LLVM loop annotations printed beside its label."""
    blocks, cur = [], None
    for line in ptx.splitlines():
        s = line.strip()
        m = re.match(r"^(\$L__BB\d+_\d+):|^// %bb\.(\d+):", s)
        if m:
            cur = {"name": m.group(1) or f"%bb.{m.group(2)}", "notes": s, "lines": []}
            blocks.append(cur)
        elif cur is not None:
            if s.startswith("//") and not cur["lines"]:
                cur["notes"] += " " + s
            else:
                cur["lines"].append(s)
    return blocks


def main_loop(ptx: str) -> dict:
    """The innermost loop holding the most wgmma instructions, read off LLVM's loop annotations: does it load
    through TMA, and is there a block in it that issues wgmma and waits only for older groups (wait_group
    N >= 1), with no block issuing wgmma that waits for zero? A flattened loop also holds its tile's epilogue,
    which does wait for zero before the store: that block issues only the rank-r term's wgmma, no more than
    the K step's pipelined block, which is how the two are told apart."""
    blocks = _blocks(ptx)
    headers = [re.sub(r"^\$L__", "", b["name"]) for b in blocks if "Inner Loop Header" in b["notes"]]
    best = None
    for h in headers:
        body = [b for b in blocks if b["name"] == f"$L__{h}" or f"Header={h} " in b["notes"] + " "]
        n = sum(sum("wgmma.mma_async" in x for x in b["lines"]) for b in body)
        if best is None or n > best[1]:
            best = (body, n)
    if best is None or best[1] == 0:
        return {"found": False, "wgmma": 0, "tma": False, "async": False}
    body = best[0]

    def waits(b):
        return [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+);", "\n".join(b["lines"]))]

    def issued(b):
        return sum("wgmma.mma_async" in x for x in b["lines"])

    issuing = [b for b in body if issued(b)]
    pipelined = [b for b in issuing if waits(b) and min(waits(b)) >= 1]
    return {"found": True, "wgmma": best[1], "waits": [waits(b) for b in issuing],
            "tma": any("cp.async.bulk.tensor" in x and ".global.mbarrier" in x for b in body for x in b["lines"]),
            "async": bool(pipelined) and max(map(issued, pipelined)) >= max(map(issued, issuing))}


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def _row(kernel: str, family: str, config, rp: int, c) -> dict:
    reg, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(c.asm["cubin"], "-res-usage")).groups())
    row = {"kernel": kernel, "family": family, "config": list(config), "rp": rp, "cap": CAP[family],
           "shared_bytes": c.metadata.shared, "registers": reg, "stack_bytes": stack,
           "wgmma_ptx": "wgmma" in c.asm["ptx"], "triton": triton.__version__}
    if family == "hopper" and kernel in GEMMS:
        row["hgmma_sass"] = "HGMMA" in _cuobjdump(c.asm["cubin"], "-sass")
        row["main_loop"] = main_loop(c.asm["ptx"])
    return row


def compile_report(families=("hopper", "ampere"), ranks=(16, 64)) -> list[dict]:
    """Every kernel at every config and rank for its chip."""
    rows = []
    for family in families:
        for layout in GEMMS:
            for cfg in G.CONFIGS[family]:
                for rp in ranks if GEMMS[layout]["HAS_LOWRANK"] else (16,):
                    rows.append(_row(layout, family, cfg, rp, compile_gemm(layout, CAP[family], cfg, rp)))
        for kind, cfg in L.SMALL[family].items():
            for rp in ranks:
                rows.append(_row(kind, family, cfg, rp, compile_small(kind, CAP[family], cfg, rp)))
    if "hopper" in families:  # why warp specialisation is not in CONFIGS: its main loop, for the record
        for cfg in WS_PROBES:
            rows.append(dict(_row("fwd", "hopper", cfg, 16, compile_gemm("fwd", 90, cfg, 16)), probe=True))
    return rows


WS_PROBES = [(128, 128, 64, 4, 4, True, False, True), (128, 256, 64, 8, 3, True, False, True)]


if __name__ == "__main__":
    print(json.dumps(compile_report()))
