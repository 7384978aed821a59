"""The Triton kernels compile for an H100 (sm_90) with the real compiler, on a machine without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "moe_kernels._triton.compile_check", "--arch", "90", "--dtypes", "bf16,fp32",
           "--widths", "64,64"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_90")]
    assert len(lines) == 12, proc.stdout  # forward, dgrad, wgrad x (bf16, fp32) x (NCHW, channels_last)
    assert all(": ok," in line for line in lines)
