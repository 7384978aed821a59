"""Exact resume: a run stopped (or SIGKILLed) mid-epoch and resumed reaches the uninterrupted run's weights."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from helpers.train_utils import PYTHON, REPO, subprocess_env, tiny_config, write_config

from advmoe.checkpoint import load_checkpoint
from advmoe.train import ExperimentConfig, train


def assert_same_state(a: dict, b: dict) -> None:
    assert a["state"]["global_step"] == b["state"]["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs"
    for name, opt in a["optimizers"].items():
        for pid, st in opt["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, b["optimizers"][name]["state"][pid][k]), f"{name} state {pid}.{k} differs"


def test_stop_and_resume_mid_epoch_equals_uninterrupted(tmp_path):
    # 64 samples / batch 16 = 4 steps per epoch; stopping after 3 steps is mid-epoch, resuming crosses an epoch
    base = tiny_config("pgd_at", save_every_steps=1, deterministic=True, eval_attack={"steps": 0})
    straight = dict(base, train=dict(base["train"], max_steps=5))
    train(ExperimentConfig.from_dict(straight), tmp_path / "a")
    first = dict(base, train=dict(base["train"], max_steps=3))
    train(ExperimentConfig.from_dict(first), tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "last.pt")["state"]["batch_in_epoch"] == 3
    train(ExperimentConfig.from_dict(straight), tmp_path / "b", resume=True)
    assert not torch.are_deterministic_algorithms_enabled()  # train() restored the global flag
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert_same_state(a, b)
    assert (tmp_path / "b" / "epochs.csv").exists() and (tmp_path / "b" / "curves.png").stat().st_size > 0


def test_resume_refuses_incompatible_runs(tmp_path):
    cfg = tiny_config("pgd_at", max_steps=1, eval_attack={"steps": 0}, attack={"steps": 0})
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(ExperimentConfig.from_dict(cfg), tmp_path, resume=True)
    train(ExperimentConfig.from_dict(cfg), tmp_path)
    smaller = dict(cfg, train=dict(cfg["train"], batch_size=8))
    with pytest.raises(ValueError, match="cannot resume mid-epoch"):
        train(ExperimentConfig.from_dict(smaller), tmp_path, resume=True)
    with pytest.raises(ValueError, match="seed config differs"):
        train(ExperimentConfig.from_dict(dict(cfg, seed=8)), tmp_path, resume=True)
    cfg["model"]["ratio"] = 0.5
    with pytest.raises(ValueError, match="model config differs"):
        train(ExperimentConfig.from_dict(cfg), tmp_path, resume=True)


def _command(config, out, *extra):
    return [PYTHON, "-m", "advmoe", "train", "--config", str(config), "--out", str(out), *extra]


def test_sigkilled_subprocess_resumes_to_the_same_weights(tmp_path):
    """Kill a training process with SIGKILL right after a mid-epoch checkpoint, resume it, compare weights."""
    cfg = tiny_config(
        "advmoe", max_steps=10, save_every_steps=1, deterministic=True, eval_attack={"steps": 0}, log_every_steps=1
    )
    config = write_config(tmp_path / "run.yaml", cfg)
    env = subprocess_env()
    reference = subprocess.Popen(
        _command(config, tmp_path / "ref"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        _command(config, tmp_path / "kill"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = tmp_path / "kill" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = load_checkpoint(last)["state"]
    assert 1 <= state["global_step"] < 10 and state["batch_in_epoch"] > 0  # really mid-epoch
    resumed = subprocess.run(
        _command(config, tmp_path / "kill", "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    assert_same_state(load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(last))
    assert '"event": "resume"' in (tmp_path / "kill" / "log.jsonl").read_text()
