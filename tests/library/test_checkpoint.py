"""Checkpoints: atomic saves, weights_only loading that refuses (never runs) pickled code, output-dir checks, and
the model checkpoint formats (``advmoe train``'s and the research code's) through the one loader ``load_model``.
The formats are tested here only."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from advmoe.checkpoint import (
    CHECKPOINT_FORMAT,
    ResearchSpec,
    UnsafeCheckpointError,
    capture_rng_state,
    check_checkpoint_tree,
    check_output_dir,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)


class _CreatesFile:
    """Unpickling this object runs ``open(path, "w")`` (what a malicious checkpoint would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_roundtrip_keeps_tensors_and_values(tmp_path):
    obj = {
        "model": {"w": torch.randn(3, 4), "n": torch.tensor(5)},
        "epoch": 3,
        "lr": 0.1,
        "name": "x",
        "flags": [True, None],
        "shape": torch.Size([2, 3]),
        7: (1, 2),
    }
    path = save_checkpoint(obj, tmp_path / "ck.pt")
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert back["epoch"] == 3 and back["name"] == "x" and back["flags"] == [True, None] and back[7] == (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left behind


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _CreatesFile(str(target))}, bad, pickle_protocol=2)
    target.unlink(missing_ok=True)  # torch.save does not run __reduce__'s callable, but be sure
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_checkpoint(bad)
    assert not target.exists()
    raw = tmp_path / "raw.pkl"  # a plain pickle (not a torch zip file) with the same payload
    raw.write_bytes(pickle.dumps(_CreatesFile(str(target)), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(raw)
    assert not target.exists()


def test_research_code_checkpoint_loads(tmp_path):
    ck = {
        "epoch": 100,
        "arch": "resnet18",
        "state_dict": {"conv1.weight": torch.randn(4, 3, 3, 3)},
        "router": {"fc.weight": torch.randn(2, 8)},
        "best_acc": 51.2,
        "sa_record": 80.1,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }
    torch.save(ck, tmp_path / "model_best.pth.tar")
    back = load_checkpoint(tmp_path / "model_best.pth.tar")
    assert back["best_acc"] == 51.2 and torch.equal(back["router"]["fc.weight"], ck["router"]["fc.weight"])


def test_not_a_dict_or_missing_or_garbage(tmp_path):
    torch.save(torch.ones(2), tmp_path / "t.pt")
    with pytest.raises(UnsafeCheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "t.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "g.pt")


def test_save_refuses_unsafe_values_and_names_them(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\['opt'\]\[0\] is a numpy.ndarray"):
        save_checkpoint({"opt": [np.zeros(2)]}, tmp_path / "x.pt")
    with pytest.raises(UnsafeCheckpointError, match="key of type"):
        check_checkpoint_tree({(1, 2): 3})
    assert not (tmp_path / "x.pt").exists()


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_output_dir_checks(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot be created"):
        check_output_dir(blocker / "run")
    with pytest.raises(OSError, match="MiB free"):
        check_output_dir(tmp_path, min_free_mb=1e12)
    assert not any(p.name.startswith(".write_probe") for p in tmp_path.iterdir())


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    state = capture_rng_state()
    save_checkpoint({"rng": state}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# --- the model checkpoint formats, through load_model -------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """``last.pt`` of a one-step ``advmoe train`` run (written by the trainer itself)."""
    from helpers.train_utils import tiny_config

    from advmoe.train import ExperimentConfig, train

    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config("advmoe", epochs=1, max_steps=1, eval_samples=8)
    train(ExperimentConfig.from_dict(cfg), out)
    return out / "last.pt", cfg


def _count_reads(monkeypatch) -> list:
    reads = []
    original = torch.load

    def counting_load(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return reads


def test_training_checkpoint_format_and_load_model(trained_checkpoint, monkeypatch):
    path, cfg = trained_checkpoint
    reads = _count_reads(monkeypatch)
    model, ckpt = load_model(path)
    assert len(reads) == 1  # the file is read once
    assert ckpt["format"] == CHECKPOINT_FORMAT == "advmoe.train/1"
    assert {"model", "model_args", "config", "optimizers", "state", "world_size", "rng"} <= set(ckpt)
    assert ckpt["model_args"]["name"] == "resnet10_mini" and ckpt["model_args"]["num_experts"] == 2
    assert ckpt["config"]["data"]["name"] == "digits" and ckpt["config"]["data"]["kwargs"] == cfg["data"]["kwargs"]
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    again, _ = load_model(ckpt, research=ResearchSpec("resnet18_cifar"))  # a loaded dict; research not needed
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_research_checkpoint_format_and_load_model(tmp_path, monkeypatch):
    from helpers.masked_moe import ResearchResNetCifar, randomize_

    torch.manual_seed(0)
    research = randomize_(ResearchResNetCifar(0.25, 2)).eval()
    path = tmp_path / "model_best.pth.tar"  # the research code's layout: the router also sits in every MoE layer
    torch.save({"state_dict": research.state_dict(), "router": research.router.state_dict(), "epoch": 7}, path)
    reads = _count_reads(monkeypatch)
    model, ckpt = load_model(path, research=ResearchSpec("resnet18_cifar_moe", num_experts=2, ratio=0.25))
    assert len(reads) == 1 and ckpt["epoch"] == 7 and not model.training
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), research(x), rtol=1e-4, atol=1e-5)
    as_dict, _ = load_model(path, research={"arch": "resnet18_cifar", "num_experts": 2, "ratio": 0.25})
    assert as_dict.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="research-code checkpoint.*--arch"):
        load_model(path)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(path, research=ResearchSpec("resnet18_cifar", num_experts=2, ratio=0.5))


def test_load_model_refuses_other_files(tmp_path):
    torch.save({"format": "something else", "weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither an `advmoe train` checkpoint"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    torch.save({"evil": _CreatesFile(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
