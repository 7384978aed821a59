"""``advmoe demo --quick``: training both models, conversion, logits check, cost table, plots, end to end."""

import json

import pytest
import torch

from advmoe.cli import main
from advmoe.demo import run_demo
from advmoe.deploy import load_deployed


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"router": "moe"}, "router"),
        ({"autoattack": "slow"}, "autoattack"),
        ({"epochs": 0}, "epochs"),
        ({"latency_batches": [1, 0]}, "latency_batches"),
        ({"aa_samples": 2.5}, "aa_samples"),
    ],
)
def test_run_demo_names_a_bad_argument_before_any_work(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        run_demo(out=tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # mode="auto" picks pathway or grouped by timing them on this machine
    assert "SA" in printed and "RA" in printed
    assert "deployed (pathway mode)" in printed or "deployed (grouped mode)" in printed
    assert "expert usage of the MoE model per layer" in printed and "AutoAttack fast (2 iterations" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sa_ra"]) == {"advmoe", "dense_at"}
    for row in summary["sa_ra"].values():
        assert 0.0 <= row["sa"] <= 1.0 and 0.0 <= row["ra"] <= row["sa"] + 1e-9
    usage = summary["expert_usage"]
    assert len(usage) == 8  # resnet10_mini: 8 MoE layers, all driven by the model-level image router
    for shares in usage.values():
        assert len(shares) == 2 and abs(sum(shares) - 1) < 1e-6
    aa = summary["autoattack"]
    assert aa["variant"].startswith("AutoAttack fast") and aa["n"] == 32
    for label in ("advmoe", "dense_at"):
        assert 0.0 <= aa[label]["ra"] <= aa[label]["sa"] <= 1.0
    deploy = summary["deploy"]
    assert deploy["mode"] in ("pathway", "grouped")
    assert deploy["max_abs_diff"] < 1e-3 and deploy["prediction_agreement"] == 1.0
    costs = summary["costs"]
    assert set(costs["flops_g"]) == {"dense", "masked", "sparse", "deployed", "ideal", "router"}
    assert "BatchNorm folded" in costs["treatment"]  # like-for-like: every side gets the same treatment
    assert costs["flops_g"]["deployed"] <= costs["flops_g"]["sparse"] < costs["flops_g"]["masked"]
    assert costs["flops_g"]["deployed"] < 0.5 * costs["flops_g"]["dense"]  # the cheap image router: the MoE is cheaper
    assert all(set(v) == {"1", "4"} or set(v) == {1, 4} for v in costs["latency_ms"].values())
    for name in ("demo.png", "costs.md", "deployed.pt", "advmoe/last.pt", "dense_at/last.pt"):
        assert (out / name).is_file(), name
    deployed = load_deployed(out / "deployed.pt")
    with torch.no_grad():
        assert deployed(torch.rand(3, 3, 32, 32)).shape == (3, 10)
