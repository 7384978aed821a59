"""The ``advmoe`` command line: train and eval end to end, clear errors with exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers.train_utils import PYTHON, REPO, subprocess_env, tiny_config, write_config

from advmoe.cli import build_parser, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step AdvMoE run through the CLI (module-scoped: the eval tests reuse its checkpoint)."""
    tmp = tmp_path_factory.mktemp("cli")
    config = write_config(tmp / "run.yaml", tiny_config("advmoe", epochs=1, max_steps=2, eval_samples=8))
    rc = main(["train", "--config", str(config), "--out", str(tmp / "run"), "train.log_every_steps=1"])
    return rc, tmp / "run"


def test_train_writes_logs_plot_and_checkpoints(trained):
    rc, run = trained
    assert rc == 0
    for name in ("last.pt", "best_ra.pt", "log.jsonl", "epochs.csv", "curves.png"):
        assert (run / name).is_file(), name
    events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("step") == 2 and "epoch" in events and events[-1] == "stop"
    header = (run / "epochs.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "sa", "ra"} <= set(header)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_a_trained_checkpoint(trained, tmp_path):
    _, run = trained
    out = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            str(run / "best_ra.pt"),
            "--output",
            str(out),
            "--device",
            "cpu",
            "attacks=[pgd_ce]",
            "pgd_steps=1",
            "pgd_restarts=1",
            "max_samples=8",
            "router_attack_steps=1",
            "eval.batch_size=8",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 8 and 0.0 <= result["ra"]["pgd_ce"] <= result["sa"] <= 1.0


def test_bad_config_key_exits_2_and_lists_known_keys(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "r"), "train.epoch=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key(s) ['epoch']" in err and "'epochs'" in err and "Traceback" not in err


def test_unwritable_output_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["train", "--out", str(blocker / "run"), "device=cpu"] + _tiny_overrides())
    assert rc != 0 and "cannot be created" in capsys.readouterr().err


def test_eval_refuses_a_malicious_checkpoint(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    rc = main(["eval", str(tmp_path / "evil.pt")])
    assert rc == 2 and "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_missing_config_file_and_module_entry_point(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]) == 2
    assert "none.yaml" in capsys.readouterr().err
    proc = subprocess.run(
        [PYTHON, "-m", "advmoe", "train", "--help"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--resume" in proc.stdout
    assert {"train", "eval"} <= set(build_parser()._subparsers._group_actions[0].choices)


def _tiny_overrides() -> list[str]:
    return ["model.name=resnet10_mini", "data.name=digits", "train.epochs=1", "train.progress=false"]
