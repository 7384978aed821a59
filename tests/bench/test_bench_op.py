"""benchmarks/bench_op.py (v2) runs on CPU at tiny sizes and writes results tied to the code; claims.json."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_op", os.path.join(ROOT, "benchmarks", "bench_op.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_op"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_op_quick_writes_results(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_op.py"),
        "--quick",
        "--quiet",
        "--out-dir",
        str(tmp_path),
        "--threads",
        "1",
        "--processes",
        "2",
        "--modes",
        "fwd",
        "fwd+bwd",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "op_bench.json").read_text())
    for key in ("device", "device_slug", "dtype", "tf32", "commit", "command", "torch", "triton", "cuda", "rows"):
        assert key in doc, f"missing {key!r} in op_bench.json"
    assert doc["device_slug"] == "cpu-1core" and doc["processes"] == 2 and doc["tf32"] is False
    assert len(doc["commit"].split("+")[0]) == 40
    assert {"reference", "slices"} <= set(doc["backends"])
    methods = {r["method"] for r in doc["rows"]}
    assert {"slim", "slim+epilogue", "masked", *doc["backends"]} == methods
    assert {(r["batch"], r["mode"]) for r in doc["rows"]} == {(b, m) for b in (2, 5) for m in ("fwd", "fwd+bwd")}
    for r in doc["rows"]:
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["vs_slim"] > 0
        assert r["timing"] == "eager" and r["graph_ms"] is None
        if r["method"] in doc["backends"]:
            assert r["max_err_vs_fp32"] < 1e-4, r
        if r["method"] == "reference":  # per-expert library calls: one host read of the plan per call
            assert r["host_reads"] >= 1
    table = (tmp_path / "op_bench.md").read_text()
    assert "| quick (8, 4, 3, 8x8) | 5 | fwd+bwd |" in table and "min/median/max" in table


def test_claims_from_bench_docs(tmp_path):
    bench = _bench_module()

    def row(method, mode, ratio, shape="a"):
        return {
            "shape": shape,
            "batch": 256,
            "mode": mode,
            "method": method,
            "vs_slim": ratio,
            "d2h_copies": 0.0,
            "syncs": 1.0 if method == "cuda" else 0.0,
        }

    doc = {
        "dtype": "bf16",
        "tf32": False,
        "backends": ["triton", "cuda"],
        "rows": [
            row("triton", "fwd", 3.0),
            row("triton", "fwd", 5.0, "b"),
            row("cuda", "fwd", 2.0),
            row("cuda", "fwd", 2.5, "b"),
            row("triton", "fwd+bwd", 4.0),
            row("cuda", "fwd+bwd", 6.0),
        ],
    }
    claims = {c["id"]: c for c in bench.op_claims([doc])}
    assert claims["op.fwd.bf16.b256.worst_vs_slim.triton"]["value"] == 5.0
    assert claims["op.fwd.bf16.b256.worst_vs_slim"]["value"] == 2.5  # best backend's worst shape
    assert claims["op.fwdbwd.bf16.b256.worst_vs_slim"]["value"] == 4.0
    assert claims["op.host_syncs_per_call.bf16"]["value"] == 1.0
    path = bench.write_claims(str(tmp_path), list(claims.values()), device="test-device", commit="abc")
    with open(path) as f:
        written = json.load(f)
    assert written["commit"] == "abc" and written["device"] == "test-device" and len(written["claims"]) == len(claims)
    with pytest.raises(ValueError, match="lacks"):
        bench.write_claims(str(tmp_path), [{"id": "x", "value": 1}], device="d")
