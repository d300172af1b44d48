"""benchmarks/gpu_suite.sh is the one call made on a lent GPU; its dry run keeps it from rotting."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| build | skipped: no CUDA device (dry run)" in summary
    assert "| bench_lora_cpu | ok" in summary and "| bench_logprob_cpu | ok" in summary
    assert (tmp_path / "lora_cpu.json").exists() and (tmp_path / "logprob_cpu.json").exists()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| bench_e2e_gpu_stub | ok")
