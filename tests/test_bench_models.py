"""The model benchmark (advmoe.bench): masked baseline, timing, routing balance, and the --quick run's outputs."""

import json

import pytest
import torch

from advmoe.bench.masked import to_masked
from advmoe.bench.models import IdealModel, balance_router, flops_per_image
from advmoe.bench.timing import time_interleaved
from advmoe.cli import main
from advmoe.models import create_model


def _moe(**kwargs):
    torch.manual_seed(0)
    args = {"num_experts": 2, "ratio": 0.5, "backend": "reference"}
    args.update(kwargs)
    return create_model("resnet10_mini", **args).eval()


@pytest.mark.parametrize("kwargs", [{}, {"num_experts": 3, "top_k": 2}, {"router": "per_layer"}], ids=str)
def test_masked_baseline_matches_sparse_model(kwargs):
    model = _moe(**kwargs)
    x = torch.rand(5, 3, 32, 32)
    balance_router(model, x)
    masked = to_masked(model)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), model(x), atol=1e-5, rtol=1e-4)


def test_masked_baseline_executes_all_experts_flops():
    model = _moe()
    x = torch.rand(1, 3, 32, 32)
    sparse, _ = flops_per_image(model, x)
    masked, unpriced = flops_per_image(to_masked(model), x)
    router, _ = flops_per_image(IdealModel(model, create_model("resnet10_mini", ratio=0.5)), x)
    assert masked > sparse > router > 0
    assert "aten::one_hot" in unpriced  # reported, not silently priced


def test_balance_router_splits_batch_without_ties():
    model = _moe()
    x = torch.rand(8, 3, 32, 32)
    balance_router(model, x)
    with torch.no_grad():
        scores = model.router(model.normalize(x) if model.normalize is not None else x)
    assert torch.bincount(scores.argmax(1), minlength=2).tolist() == [4, 4]
    assert (scores[:, 1] - scores[:, 0]).abs().min() > 0


def test_time_interleaved_rounds_and_errors():
    calls = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), 1, 3)
    assert calls == ["a", "b"] * 4  # warm-up round, then 3 interleaved rounds
    assert set(out) == {"a", "b"} and out["a"]["repeats"] == 3 and out["a"]["median_ms"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, torch.device("cpu"), 0, 0)
    busy = time_interleaved(
        {"mm": lambda: torch.ones(200, 200) @ torch.ones(200, 200)}, torch.device("cpu"), 0, 2, clock="thread"
    )
    assert busy["mm"]["median_ms"] > 0
    with pytest.raises(ValueError, match="clock"):
        time_interleaved({"a": lambda: None}, torch.device("cpu"), 0, 1, clock="gpu")


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--backends", "reference", "--out", str(out)]) == 0
    return out


def test_bench_quick_writes_json_md_png(quick_bench):
    assert {p.name for p in quick_bench.iterdir()} >= {"models_bench.json", "models_bench.md", "models_bench.png"}
    results = json.loads((quick_bench / "models_bench.json").read_text())
    assert {"device", "device_slug", "settings", "created", "models"} <= set(results)
    assert results["settings"]["quick"] is True and results["settings"]["dtype"] == "fp32"
    (entry,) = results["models"]
    assert entry["model"] == "resnet10_mini" and entry["deploy_mode"] == "pathway"
    flops = entry["flops_g"]
    assert set(flops) == {"dense", "masked", "sparse", "deployed", "ideal"}
    assert flops["deployed"] <= flops["sparse"] < flops["masked"]  # folded BN; only active channels executed
    variants = {row["variant"] for row in entry["latency"]}
    assert variants == {"dense", "masked", "sparse[reference]", "deployed", "deployed[layer]", "ideal"}
    for row in entry["latency"]:
        assert {"batch", "median_ms", "min_ms", "iqr_ms", "repeats", "vs_dense", "vs_ideal", "vs_masked"} <= set(row)
        assert row["median_ms"] > 0
    assert {row["batch"] for row in entry["latency"]} == {1, 4}
    dense = [row for row in entry["latency"] if row["variant"] == "dense"]
    assert all(row["vs_dense"] == 1.0 for row in dense)
    md = (quick_bench / "models_bench.md").read_text()
    assert "resnet10_mini" in md and "deployed" in md and "B=4" in md


def test_bench_rejects_unknown_backend_and_dtype(capsys):
    assert main(["bench", "--quick", "--backends", "nonexistent", "--out", "/tmp/unused"]) == 2
    assert "not available" in capsys.readouterr().err
    assert main(["bench", "--quick", "--dtype", "fp8", "--out", "/tmp/unused"]) == 2
