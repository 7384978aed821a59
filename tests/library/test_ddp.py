"""torchrun + DistributedDataParallel on CPU (gloo), 2 processes, a few AdvMoE steps."""

from __future__ import annotations

import json
import subprocess

import torch
from helpers.train_utils import PYTHON, REPO, subprocess_env, tiny_config, write_config

from advmoe.checkpoint import load_checkpoint
from advmoe.train.data import EpochBatchSampler


def test_torchrun_two_processes_gloo(tmp_path):
    cfg = tiny_config("advmoe", max_steps=2, eval_attack={"steps": 1}, eval_samples=16)
    config = write_config(tmp_path / "ddp.yaml", cfg)
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "advmoe",
        "train",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["state"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2
    epoch = [e for e in events if e["event"] == "epoch"][-1]
    assert epoch["eval_samples"] == 16  # the two ranks' evaluation shards were summed


def test_shards_cover_the_data_with_equal_sizes():
    shards = [EpochBatchSampler(10, 2, seed=3, epoch=1, rank=r, world_size=3, drop_last=False) for r in range(3)]
    flat = [sorted(i for b in s.batches for i in b) for s in shards]
    assert len({len(f) for f in flat}) == 1  # 10 padded to 12: every rank gets 4 samples
    everything = [i for f in flat for i in f]
    assert len(everything) == 12 and set(everything) == set(range(10))  # all samples, 2 repeated as padding
    resumed = EpochBatchSampler(10, 2, seed=3, epoch=1, rank=1, world_size=3, drop_last=False, start_batch=1)
    assert list(resumed) == shards[1].batches[1:]
