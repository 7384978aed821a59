"""Estimate a study profile's cost from measured per-step and per-image CPU times (no full run needed).

For every arm: the process CPU time of one training step (``advmoe.train`` with the profile's config,
difference of two short runs, so model building and data loading cancel) and of one image's
forward+backward at the evaluation batch size. The study's cost is then counted from its steps and attack
iterations: training steps, the per-epoch validation PGD, the research-code metric per epoch, and an
upper bound for AutoAttack (every image survives every attack; real runs stop attacking fooled images).
CPU time of one thread is the wall time on an idle core, so a quiet machine with ``jobs`` cores needs about
total / jobs. Shared machines need more.

Usage::

    python benchmarks/robustness/estimate_cost.py --profile cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parents[1]):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from study_config import arm_config, load_study, select_arms  # noqa: E402


def step_cpu_seconds(cfg, steps: int = 10) -> float:
    """CPU seconds of one training step: (run of 2 + steps) - (run of 2), both with a tiny monitor.

    A first run of 2 steps warms up (lazy initialisation, caches) and is not counted.
    """
    from advmoe.train import train

    times = []
    for n in (2, 2, 2 + steps):
        c = copy.deepcopy(cfg)
        c.train.max_steps, c.train.eval_samples, c.train.log_every_steps = n, 8, 0
        with tempfile.TemporaryDirectory() as d:
            start = time.process_time()
            train(c, d)
            times.append(time.process_time() - start)
    return max(times[2] - times[1], 0.0) / steps


def pass_cpu_seconds(cfg, batch: int, reps: int = 3) -> float:
    """CPU seconds of one image's forward+backward (input gradient) at ``batch`` in eval mode."""
    from advmoe.attacks import pgd
    from advmoe.train.trainer import build_model

    model = build_model(cfg)[0].eval()
    size = cfg.data.kwargs.get("size", 28)
    x, y = torch.rand(batch, 1, size, size), torch.randint(0, 10, (batch,))
    pgd(model, x, y, 0.1, 0.025, 1)
    start = time.process_time()
    pgd(model, x, y, 0.1, 0.025, reps)
    return (time.process_time() - start) / (reps * batch)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=HERE / "study.yaml")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--arms", nargs="+", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    study = load_study(args.config, args.profile)
    ev, seeds = study["eval"], study["seeds"]
    out = {"profile": args.profile, "seeds": len(seeds), "jobs": study["jobs"], "arms": {}}
    total = 0.0
    for arm in select_arms(study, args.arms):
        cfg = arm_config(study, arm, 0)
        from study_run import _steps_per_epoch

        epochs, steps = cfg.train.epochs, _steps_per_epoch(cfg)
        step_s = step_cpu_seconds(cfg)
        pass_s = pass_cpu_seconds(cfg, int(ev.get("batch_size", 500)))
        n_val = 500 if cfg.train.eval_samples is None else cfg.train.eval_samples
        n_test = 1500 if ev.get("test_samples") is None else ev["test_samples"]
        aa = ev.get("autoattack") or {}
        it = aa.get("n_iter") or (100 if aa.get("version", "standard") == "standard" else 50)
        targets = aa.get("n_targets") or (9 if aa.get("version", "standard") == "standard" else 3)
        queries = aa.get("square_queries") or 0
        eps = len(ev["eps"])
        rp = ev.get("research_pgd") or {}
        n_rp = n_test if rp.get("samples") is None else rp["samples"]
        passes = {
            "validation_pgd": epochs * n_val * (cfg.train.eval_attack.steps + 1),
            "research_metric": epochs * eps * n_rp * (rp.get("steps", 10) + 1),
            "autoattack_upper_bound": eps * n_test * (it * (1 + targets) + queries / 3),  # forward ~ 1/3 pass
        }
        train_s = epochs * steps * step_s
        eval_s = sum(passes.values()) * pass_s
        out["arms"][arm] = {
            "step_cpu_s": round(step_s, 4),
            "image_pass_cpu_ms": round(1e3 * pass_s, 4),
            "train_cpu_s_per_run": round(train_s, 1),
            "eval_cpu_s_per_run_upper_bound": round(eval_s, 1),
        }
        total += len(seeds) * (train_s + eval_s)
        print(arm, out["arms"][arm], flush=True)
    out["total_cpu_s_upper_bound"] = round(total, 1)
    out["wall_s_on_idle_cores_upper_bound"] = round(total / max(1, study["jobs"]), 1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
