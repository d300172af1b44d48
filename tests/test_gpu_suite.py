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


def test_e2e_gpu_runs_its_variants_on_cpu(tmp_path):
    """bench e2e-gpu only ever runs on a lent GPU; its CPU mode runs the same code small, so that it cannot
    rot between leases (it had: a model built from the wrong dict, LoRA init with a CPU generator)."""
    import json

    from lune_fast.bench import e2e_gpu

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "vocab_size": 300, "num_hidden_layers": 2}))
    out = tmp_path / "e2e.json"
    assert e2e_gpu.main(["--shapes", str(cfg), "--tokens", "128", "--seq", "64", "--answer", "16", "--steps", "2",
                         "--objective", "npo", "--variants", "lune_fast,hf_peft", "--device", "cpu",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["lune_fast", "hf_peft"]
    assert all(r["error"] is None and r["tokens/s"] > 0 for r in rows)


def test_kernel_split_and_grouped_rows_run_on_cpu():
    """bench lora's GPU-only parts (each launch timed alone; grouped q+k+v and gate+up) run here under
    Triton's interpreter on a tiny shape, so they cannot rot between leases. Ratios are not judged here."""
    import math

    import pytest
    import torch

    from lune_fast.bench import lora as bench
    from lune_fast.kernels import lora_linear as K

    if not K.available():
        pytest.skip("triton unavailable")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 64, generator=g), torch.randn(48, 64, generator=g) * 0.1
    A, B, dy = torch.randn(8, 64, generator=g), torch.randn(48, 8, generator=g), torch.randn(40, 48, generator=g)
    split = bench.kernel_split(x, w, A, B, 2.0, dy, repeats=1)
    assert set(split) == {"fwd_vs_cublas", "dx_vs_cublas", "plain_vs_cublas", "shrink_us", "dy_us", "ds_x_us"}
    assert all(math.isfinite(v) and v > 0 for v in split.values())
    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
    rows = bench.grouped_rows(cfg, 24, 8, torch.float32, "cpu", repeats=1, sync=None)
    assert [r["proj"] for r in rows] == ["q+k+v", "gate+up"] and [r["out"] for r in rows] == [128, 192]
