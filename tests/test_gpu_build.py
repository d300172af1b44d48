"""GPU code checked on a machine without a GPU: the CUDA sources compile with nvcc for sm_80 and sm_90a,
and the Triton kernels compile to PTX/cubin for both chips with wgmma, no spills and shared memory that fits."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lune_fast.kernels import lora_linear as K

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


def test_triton_kernels_compile_for_hopper_and_ampere(triton_report):
    for row in triton_report:
        name = f"{row['kind']} {row['family']} {row['config']}"
        assert row["stack_bytes"] == 0, f"{name}: register spills ({row['stack_bytes']} bytes of stack)"
        # the autotuner prunes by this estimate, so it must not be below what the compiler allocates
        BM, b, c, _, stages, rp = row["config"]
        BN, BK = (b, c) if row["kind"] == "fwd" else (c, b)
        assert K.shared_bytes(row["kind"], BM, BN, BK, stages, rp, 2) >= row["shared_bytes"], name
        if row["family"] == "hopper":
            assert row["wgmma_ptx"] and row["hgmma_sass"], f"{name}: no wgmma/HGMMA"
            assert row["shared_bytes"] <= HOPPER_SMEM, name
        else:
            assert row["shared_bytes"] <= AMPERE_SMEM, name
    kinds = {(r["family"], r["kind"]) for r in triton_report}
    assert kinds == {("hopper", "fwd"), ("hopper", "bwd"), ("ampere", "fwd"), ("ampere", "bwd")}
