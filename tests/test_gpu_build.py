"""GPU code checked on a machine without a GPU: the CUDA sources compile with nvcc for sm_80 and sm_90a, and
the Triton kernels compile to PTX/cubin for both chips without spills and with shared memory that fits; on
sm_90a the two GEMMs' main loops load through TMA and keep their wgmma asynchronous."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CU_FILES = sorted(REPO.glob("csrc/**/*.cu"))
HOPPER_SMEM = 227 * 1024
AMPERE_SMEM = 163 * 1024


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"],
                         ids=["sm_80", "sm_90a"])
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_sources_compile_without_spills(cu, arch, tmp_path):
    proc = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", arch, "-Xptxas", "-v", str(cu), "-o",
                           str(tmp_path / "k.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = proc.stderr
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", report)]
    print(f"{cu.name} {arch.split('=')[-1]}: {len(regs)} kernels, registers {regs}, spill stores {spills}")
    assert regs and max(regs) <= 64 and not any(spills)


@pytest.fixture(scope="module")
def triton_report():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-m", "lune_fast.bench.kernel_build"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _name(row):
    return f"{row['kernel']} {row['family']} {row['config']} r{row['rp']}"


def test_triton_kernels_compile_without_spills(triton_report):
    kept = [r for r in triton_report if not r.get("probe")]
    assert {(r["family"], r["kernel"]) for r in kept} == {
        (f, k) for f in ("hopper", "ampere") for k in ("fwd", "dx", "plain", "shrink", "dy", "ds_x")}
    for row in kept:
        assert row["stack_bytes"] == 0, f"{_name(row)}: register spills ({row['stack_bytes']} bytes of stack)"


def test_hopper_gemm_main_loops_use_tma_and_async_wgmma(triton_report):
    """The forward and dx GEMMs (and the plain one) on sm_90a: wgmma in the PTX and HGMMA in the SASS, the main
    loop's operands through TMA, and its wgmma left in flight across iterations (wait_group >= 1, never 0)."""
    gemms = [r for r in triton_report if r["family"] == "hopper" and r["kernel"] in ("fwd", "dx", "plain")]
    assert gemms
    for row in gemms:
        loop = row["main_loop"]
        if row.get("probe"):  # warp specialisation, kept out of CONFIGS for exactly this
            continue
        assert row["wgmma_ptx"] and row["hgmma_sass"], f"{_name(row)}: no wgmma/HGMMA"
        assert loop["found"] and loop["tma"], f"{_name(row)}: main loop does not load through TMA: {loop}"
        assert loop["async"], f"{_name(row)}: main loop waits for all wgmma groups: {loop}"


def test_shared_memory_estimate_bounds_the_compiler(triton_report):
    """The autotuner prunes by tma_gemm.shared_bytes, so it must never be below what the compiler allocates;
    every config the estimate admits fits the chip."""
    from lune_fast.kernels import tma_gemm as G

    for row in triton_report:
        if row["kernel"] in ("fwd", "dx", "plain") and not row.get("probe"):
            BM, BN, BK, _, stages, _, flatten, _ = row["config"]
            rp = row["rp"] if row["kernel"] != "plain" else 0
            assert G.shared_bytes(BM, BN, BK, stages, rp, 2, flatten) >= row["shared_bytes"], _name(row)
        elif not row.get("probe"):  # the fixed configs of the memory-bound kernels fit as they are
            assert row["shared_bytes"] <= (HOPPER_SMEM if row["family"] == "hopper" else AMPERE_SMEM), _name(row)


def test_main_loop_reader_tells_a_synchronous_loop():
    """The PTX reader on hand-written loops: a K step that waits for zero groups is not asynchronous; one that
    waits for all but one is; a flattened loop's epilogue block that waits for zero does not count against it."""
    from lune_fast.bench.kernel_build import main_loop

    def ptx(*blocks):
        return "\n".join(blocks)

    head = "$L__BB0_3:  // =>This Inner Loop Header: Depth=1"
    tma = "cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];"
    mma = "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%r5}, %rd2, %rd3, p, 1, 1, 0, 1;"
    back = "@%p1 bra $L__BB0_3;"
    sync = ptx(head, tma, mma, mma, "wgmma.wait_group.sync.aligned 0;", back)
    pipelined = ptx(head, tma, mma, mma, "wgmma.wait_group.sync.aligned 1;", back)
    flattened = ptx(head, tma, mma, mma, "wgmma.wait_group.sync.aligned 1;",
                    "// %bb.4:  //   in Loop: Header=BB0_3 Depth=1", mma, "wgmma.wait_group.sync.aligned 0;", back)
    assert main_loop(sync) == main_loop(sync) | {"tma": True, "async": False}
    assert main_loop(pipelined)["async"] and main_loop(flattened)["async"]
    assert not main_loop(ptx(head, mma, "wgmma.wait_group.sync.aligned 1;", back))["tma"]
