"""benchmarks/bench_op.py --quick runs and writes the JSON + markdown results with the documented fields."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_op_quick_writes_results(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_op.py"), "--quick", "--quiet", "--out-dir",
           str(tmp_path), "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "op_bench.json").read_text())
    for key in ("device", "device_slug", "dtype", "threads", "backends", "rows", "reps", "load_average"):
        assert key in doc, f"missing {key!r} in op_bench.json"
    assert doc["device_slug"] == "cpu-1core"
    assert "reference" in doc["backends"]
    methods = {r["method"] for r in doc["rows"]}
    assert {"slim", "masked", *doc["backends"]} <= methods
    assert {(r["batch"], r["mode"]) for r in doc["rows"]} == {(b, m) for b in (2, 5) for m in ("fwd", "fwd+bwd")}
    for r in doc["rows"]:
        assert r["ms"] > 0 and r["vs_slim"] > 0 and r["vs_masked"] > 0
        if r["method"] == "slim":
            assert r["vs_slim"] == 1.0
    table = (tmp_path / "op_bench.md").read_text()
    assert "| quick (8, 4, 3, 8x8) | 5 | fwd+bwd |" in table
    assert "masked" in proc.stdout
