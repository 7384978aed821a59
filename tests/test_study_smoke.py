"""CI smoke test of the robustness study (benchmarks/robustness/run_study.py --smoke): the pipeline runs
end to end (train -> evaluate -> FLOPs -> results.json, table.md, plots) and its outputs are consistent."""

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness" / "run_study.py"


def load_study_module():
    spec = importlib.util.spec_from_file_location("run_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    module = load_study_module()
    threads = torch.get_num_threads()
    try:  # one thread: tiny batches gain nothing from more, and a shared CI machine loses a lot
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = module.main(["--smoke", "--threads", "1", "--out", str(out), "--methods", "dense_at", "advmoe"])
    finally:
        torch.set_num_threads(threads)
    return module, out, results


def test_smoke_writes_results(smoke):
    _, out, results = smoke
    for name in ("results.json", "table.md", "ra_vs_flops.png", "routing_robustness.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["smoke"] is True and data["seeds"] == [0] and data["methods"] == ["dense_at", "advmoe"]
    assert data["summary"].keys() == {"dense_at", "advmoe"}
    assert data == json.loads(json.dumps(results))


def test_smoke_records_are_consistent(smoke):
    _, out, results = smoke
    runs = {r["method"]: r for r in results["runs"]}
    for method, run in runs.items():
        m = run["metrics"]
        assert run["train_steps"] == 2, method
        assert run["eval"]["num_samples"] == 8, method
        assert 0.0 <= m["ra_worst"] <= m["ra_pgd_ce"] <= m["sa"] <= 1.0, method
        assert m["ra_worst"] <= m["ra_autoattack"] <= m["sa"], method
        assert run["flops_per_image"] > 0, method
    assert runs["dense_at"]["eval"]["router_robustness"] is None and runs["dense_at"]["collapsed_layers"] is None
    assert runs["advmoe"]["moe_layers"] == 8 and 0 <= runs["advmoe"]["collapsed_layers"] <= 8
    rob = runs["advmoe"]["eval"]["router_robustness"]
    assert set(rob) == {"pgd_ce", "autoattack", "router_attack"}
    assert 0.0 <= rob["router_attack"]["all_layers"] <= 1.0
    # MoE with r = 0.5 and per-layer routers needs far fewer FLOPs than the dense model
    assert runs["advmoe"]["flops_per_image"] < 0.5 * runs["dense_at"]["flops_per_image"]
    table = (out / "table.md").read_text()
    assert "| Dense, PGD-AT | 1 |" in table and "smoke run" in table


def test_existing_results_are_reused(smoke, capsys):
    module, out, results = smoke
    again = module.main(["--smoke", "--out", str(out), "--methods", "dense_at"])
    assert "reusing" in capsys.readouterr().out
    assert again["runs"][0]["metrics"] == results["runs"][0]["metrics"]


def test_study_config_errors(tmp_path):
    module = load_study_module()
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--out", str(tmp_path), "--methods", "nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {}\nmethods: {m: {train: {strategy: nope}}}\neval: {}\n")
    with pytest.raises(ValueError, match="train.strategy"):
        module.main(["--config", str(bad), "--out", str(tmp_path)])
    assert module.deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_diverged_runs_are_reported_not_fatal(smoke, tmp_path):
    module, _, results = smoke
    good = next(r for r in results["runs"] if r["method"] == "advmoe")
    bad = {"method": "advmoe", "label": good["label"], "seed": 1, "error": "loss is not finite", "train_time_s": 1}
    summary = module.aggregate([good, bad])
    assert summary["advmoe"]["seeds"] == [0] and summary["advmoe"]["diverged"] == [1]
    assert summary["advmoe"]["metrics"]["sa"][2] == 1  # mean over the finished run only
    only_bad = module.aggregate([bad])
    assert only_bad["advmoe"]["metrics"] == {}
    table = module.write_table({**results, "methods": ["advmoe"], "summary": summary}, tmp_path / "t.md")
    assert "1 (1 more diverged)" in table
    module.plot_routing_robustness([good, bad], tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
