"""The GPU session scripts in DRY_RUN mode on a CPU machine: every planned step is listed, in order, with its
time limit; the budget and the STEPS filter skip steps; the model-benchmark script shares the step runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION_STEPS = [
    "build",
    "standalone_build",
    "standalone_run",
    "sanitize_memcheck",
    "sanitize_racecheck",
    "backends",
    "pytest_cuda_gpu",
    "sanitize_torch_cuda",
    "sanitize_torch_triton",
    "triton_tune",
    "bench_op_bf16",
    "bench_op_fp32",
    "bench_triton_slim",
    "bench_models_bf16",
]
MODEL_STEPS = [
    "pytest_deploy_cuda",
    "logits_gpu",
    "bf16_graph",
    "bf16_eager",
    "claims",
    "fp32_graph",
    "fp32_eager",
    "kernel_counts",
    "bf16_compile",
    "bf16_graph_pl",
    "bf16_eager_pl",
]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _dry_run(script: str, out: Path, **env: str) -> list[str]:
    """Runs ``script`` with DRY_RUN=1 into ``out``; returns the lines of its summary."""
    run_env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "BUDGET_S": "10000", **env}
    proc = subprocess.run(
        [BASH, str(ROOT / script), str(out)],
        env={**run_env, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (out / "summary.txt").read_text().splitlines()


def test_session_dry_run_lists_every_step_in_order(tmp_path):
    summary = _dry_run("scripts/gpu_session.sh", tmp_path)
    planned = [line.split()[1].rstrip(":") for line in summary if line.startswith("DRY ")]
    assert planned == SESSION_STEPS, summary
    commands = {line.split()[1].rstrip(":"): line for line in summary if line.startswith("DRY ")}
    assert "(limit 300 s)" in commands["triton_tune"] and f"--out {tmp_path}/tuned" in commands["triton_tune"]
    assert "-m cuda tests --junitxml" in commands["pytest_cuda_gpu"]
    assert "moe_kernels._triton.bench_slim" in commands["bench_triton_slim"]
    assert summary[-1].startswith("claims rc=0"), summary  # claims.json is written in every mode
    assert (tmp_path / "results" / "claims.json").exists()


def test_session_budget_and_step_filter(tmp_path):
    spent = _dry_run("scripts/gpu_session.sh", tmp_path / "spent", BUDGET_S="30")
    assert [line for line in spent if line.startswith("SKIP")] == [
        f"SKIP {name} (budget spent)" for name in SESSION_STEPS[1:]
    ], spent
    some = _dry_run("scripts/gpu_session.sh", tmp_path / "some", STEPS="triton_tune bench_op_*")
    assert [line.split()[1] for line in some if line.startswith("DRY ")] == [
        "triton_tune",
        "bench_op_bf16",
        "bench_op_fp32",
    ], some
    assert "SKIP build (not in STEPS)" in some and "SKIP pytest_cuda_gpu (not in STEPS)" in some


def test_model_bench_script_dry_run(tmp_path):
    summary = _dry_run("benchmarks/gpu_bench_models.sh", tmp_path)
    planned = [line.split()[1] for line in summary if line.startswith("DRY ")]
    assert planned == MODEL_STEPS, summary
    assert any("deployed[pathway]" in line for line in summary)  # variant names reach the command unglobbed
