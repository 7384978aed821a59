"""The Triton kernels compile for an H100/H200 (sm_90) with the real compiler, on a machine without a GPU,
with no register spills, shared memory within the limit and tensor-core instructions in the PTX."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    from triton.backends.nvidia.compiler import get_ptxas

    if not os.path.exists(get_ptxas(90).path):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [
        sys.executable,
        "-m",
        "moe_kernels._triton.compile_check",
        "--arch",
        "90",
        "--dtypes",
        "bf16,fp32",
        "--shapes",
        "c64w64,c35w40",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_90")]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    # forward, dgrad, wgrad partials, wgrad reduce x (bf16, fp32) x (c64w64, padded c35w40), + TMA forward x 2
    assert len(lines) == 18, proc.stdout
    assert all(": ok," in line and " 0 B spills" in line for line in lines), proc.stdout
    gemms = [line for line in lines if "reduce" not in line]
    assert len(gemms) == 14 and all("tensor cores True" in line for line in gemms), proc.stdout
    tma = [line for line in lines if "+tma" in line]
    assert len(tma) == 2 and all("TMA loads 0" not in line for line in tma), proc.stdout
