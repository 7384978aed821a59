"""Runs the hypothesis property checks of the op (``property_checks.py``) in a subprocess: a crash of
the interpreter (segfault or abort from C++) fails this test instead of the whole run."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_property_checks_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(HERE.parent / "helpers" / "property_checks.py"),
    ]
    proc = subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode >= 0, f"the interpreter crashed (signal {-proc.returncode}):\n{report}"
    assert proc.returncode == 0, f"property checks failed:\n{report}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, report
