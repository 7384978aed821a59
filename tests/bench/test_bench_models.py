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
    assert entry["model"] == "resnet10_mini" and entry["deploy_mode"] in ("pathway", "grouped")
    assert entry["deploy_reason"].startswith("auto: ") and " at B=4 " in entry["deploy_reason"]  # largest batch
    assert results["provenance"]["commit"] and results["provenance"]["command"].startswith("advmoe bench")
    assert "BatchNorm folded" in results["settings"]["treatment"] and results["settings"]["execution"] == "eager"
    flops = entry["flops_g"]
    other = "grouped" if entry["deploy_mode"] == "pathway" else "pathway"
    forms = {"deployed", f"deployed[{other}]", "deployed[layer]"}
    assert set(flops) == {"dense", "masked", "sparse", "ideal", "router", *forms}
    for form in forms:  # folded BN and router; only active channels executed; router counted
        assert flops["router"] < flops[form] <= flops["sparse"] < flops["masked"], form
    variants = {row["variant"] for row in entry["latency"]}
    assert variants == {"dense", "masked", "sparse[reference]", "ideal", "router", *forms}
    for row in entry["latency"]:
        assert {"batch", "median_ms", "min_ms", "iqr_ms", "repeats", "vs_dense", "vs_ideal", "vs_masked"} <= set(row)
        assert row["median_ms"] > 0
    assert {row["batch"] for row in entry["latency"]} == {1, 4}
    dense = [row for row in entry["latency"] if row["variant"] == "dense"]
    assert all(row["vs_dense"] == 1.0 for row in dense)
    md = (quick_bench / "models_bench.md").read_text()
    assert "resnet10_mini" in md and "deployed" in md and "B=4" in md


def test_per_layer_balance_and_like_for_like_variants():
    from advmoe.bench.models import build_variants, per_layer_share

    variants, moe = build_variants(
        "resnet10_mini",
        0.5,
        2,
        torch.device("cpu"),
        torch.float32,
        ["reference"],
        router="per_layer",
        variants=["dense", "deployed", "ideal"],
    )
    assert set(variants) == {"dense", "deployed", "ideal"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for v in variants.values() for m in v.modules())
    low, mean, high = per_layer_share(moe, torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(1234)))
    assert 0.45 <= mean <= 0.55 and low >= 0.3 and high <= 0.7  # calibrated on this very probe: near 50/50


def test_bench_channels_last_layout_on_every_side():
    from advmoe.bench.models import run_benchmark

    results = run_benchmark(
        models=["resnet10_mini"],
        batches=[3],
        repeats=1,
        warmup=0,
        progress=False,
        router="per_layer",
        variants=["dense", "deployed", "ideal"],
        layout="channels_last",
    )
    assert results["settings"]["layout"] == "channels_last"
    assert "channels_last on every side" in results["settings"]["treatment"]
    assert {row["variant"] for row in results["models"][0]["latency"]} == {"dense", "deployed", "ideal"}
    with pytest.raises(ValueError, match="layout"):
        run_benchmark(models=["resnet10_mini"], batches=[1], repeats=1, progress=False, layout="nhwc")
    from advmoe.bench.models import build_variants

    for layout, want in (("channels_last", True), ("contiguous", False)):
        variants, _ = build_variants(
            "resnet10_mini",
            0.5,
            2,
            torch.device("cpu"),
            torch.float32,
            ["reference"],
            "per_layer",
            ["dense"],
            layout=layout,
        )
        convs = [m for m in variants["dense"].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) == want for c in convs)


def test_bench_rejects_unknown_backend_and_dtype(capsys):
    assert main(["bench", "--quick", "--backends", "nonexistent", "--out", "/tmp/unused"]) == 2
    assert "not available" in capsys.readouterr().err
    assert main(["bench", "--quick", "--dtype", "fp8", "--out", "/tmp/unused"]) == 2


def test_cost_table_folds_every_side():
    from advmoe.bench.costs import cost_table
    from advmoe.deploy import to_sparse

    moe = _moe()
    dense = create_model("resnet10_mini", ratio=1.0).eval()
    x = torch.rand(4, 3, 32, 32)
    balance_router(moe, x)
    costs = cost_table(dense, moe, to_sparse(moe, mode="pathway"), torch.device("cpu"), x, (1, 2), repeats=1)
    assert set(costs["flops_g"]) == {"dense", "masked", "sparse", "deployed", "ideal", "router"}
    assert set(costs["latency_ms"]["deployed"]) == {1, 2} and "BatchNorm folded" in costs["treatment"]
    assert costs["flops_g"]["router"] < costs["flops_g"]["ideal"] <= costs["flops_g"]["sparse"]
