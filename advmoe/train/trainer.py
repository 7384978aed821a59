"""The training loop: one loop for every strategy, with exact resume, atomic checkpoints and logs.

Reproducibility: the model is initialised from ``seed``; epoch ``e`` visits the data in an order that
depends only on ``(seed, e)``; before each step the global torch RNG (attack random starts) and the
augmentation generator are seeded from ``(seed, global_step, rank)``; learning rates are a function of the
global step. A checkpoint therefore needs only weights, optimizer states, counters and the epoch's running
sums, and a run resumed from any step (mid-epoch too, with ``train.save_every_steps``) repeats the
uninterrupted run exactly (bit for bit with ``train.deterministic=true`` on the same device and world size).

Checkpoints (rank 0, atomic): ``last.pt`` after every epoch (and every ``save_every_steps`` steps),
``best_ra.pt`` when the per-epoch RA improves. A non-finite loss stops the run before the bad update,
without writing a checkpoint, so ``last.pt`` stays the last good state.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from advmoe.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    check_output_dir,
    load_checkpoint,
    load_trained_model,
    save_checkpoint,
)
from advmoe.train.config import ExperimentConfig
from advmoe.train.data import EpochBatchSampler, augment_batch, eval_batches, mix_seed, train_loader
from advmoe.train.distributed import DistInfo, barrier, init_distributed, shutdown
from advmoe.train.forward import TrainForward
from advmoe.train.losses import NonFiniteLossError
from advmoe.train.monitor import RunLog, evaluate_sa_ra
from advmoe.train.schedule import build_optimizer, lr_at, set_lr
from advmoe.train.strategies import Strategy, expert_row_parameters, optimizer_groups

# CHECKPOINT_FORMAT and load_trained_model live in advmoe.checkpoint (re-exported for the documented imports)
__all__ = ["CHECKPOINT_FORMAT", "build_model", "load_trained_model", "train"]


def build_model(cfg: ExperimentConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Create the configured model (``advmoe.models.create_model``) and return it with its arguments.

    ``num_classes`` and ``in_channels`` come from ``advmoe.data.dataset_info``; ``model.normalize =
    "dataset"`` takes the dataset's mean and std.
    """
    from advmoe.data import dataset_info
    from advmoe.models import create_model

    info = dataset_info(cfg.data.name, **cfg.data.kwargs)
    m = cfg.model
    normalize = m.normalize
    if normalize == "dataset":
        normalize = [list(info.mean), list(info.std)]
    args = {
        "name": m.name,
        "num_classes": int(info.num_classes),
        "num_experts": m.num_experts,
        "ratio": m.ratio,
        "top_k": m.top_k,
        "router": m.router,
        "router_norm": m.router_norm,
        "gate_score": m.gate_score,
        "in_channels": int(info.in_channels),
        "normalize": None if normalize is None else [[float(v) for v in part] for part in normalize],
        "backend": m.backend,
        **m.kwargs,
    }
    return create_model(**args), args


def train(cfg: ExperimentConfig, out_dir: str | os.PathLike, resume: bool | str | os.PathLike = False) -> dict:
    """Run (or resume) a training run; see the module docstring for the guarantees.

    Args:
        cfg: the experiment config.
        out_dir: run directory (created; checked to be writable with ``train.min_free_mb`` MiB free).
        resume: False; True to continue from ``out_dir/last.pt``; or a checkpoint path.

    Returns:
        Summary dict: ``out_dir``, ``global_step``, ``epoch``, ``best_ra``, ``best_epoch``, ``history``.

    Raises:
        NonFiniteLossError: a loss became NaN/inf (``last.pt`` keeps the last good state).
        OSError: the output directory is unwritable or nearly full (before any training).
    """
    dist, device = init_distributed(cfg.device)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        return _Run(cfg, Path(out_dir), resume, dist, device).fit()
    finally:  # leave the caller's process as it was (train.deterministic switches global flags)
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2:]
        shutdown(dist)


class _Run:
    def __init__(self, cfg: ExperimentConfig, out_dir: Path, resume, dist: DistInfo, device: torch.device) -> None:
        from advmoe.data import build_dataset

        self.cfg, self.out_dir, self.dist, self.device = cfg, out_dir, dist, device
        t = cfg.train
        check_output_dir(out_dir, t.min_free_mb)  # every rank: fail before any work
        ckpt = self._load_resume(resume)
        if t.batch_size % dist.world_size:
            raise ValueError(f"train.batch_size={t.batch_size} must divide by the world size {dist.world_size}")
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        _seed_everything(cfg.seed)

        d = cfg.data
        self.train_set = build_dataset(d.name, root=d.root, split="train", **d.kwargs)
        if d.max_train_samples is not None and d.max_train_samples < len(self.train_set):
            self.train_set = torch.utils.data.Subset(self.train_set, range(d.max_train_samples))
        self.test_set = build_dataset(d.name, root=d.root, split=d.test_split, **d.kwargs)

        self.model, self.model_args = build_model(cfg)
        self.model.to(device)
        groups = optimizer_groups(t, self.model)
        opt_cfg = {"model": t.optimizer, "expert": t.optimizer, "router": t.router_optimizer}
        self.opt_cfg = {name: opt_cfg[name] for name in groups}
        rows = [p for p in self.model.parameters() if id(p) in expert_row_parameters(self.model)]
        masked = () if t.decay_unused_experts else rows
        self.optimizers = {name: build_optimizer(params, opt_cfg[name], masked) for name, params in groups.items()}
        self.state: dict[str, Any] = {
            "epoch": 0,
            "batch_in_epoch": 0,
            "global_step": 0,
            "best_ra": -1.0,
            "best_epoch": -1,
            "sums": {},
            "history": [],
        }
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            for name, opt in self.optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][name])
            self.state.update(ckpt["state"])

        forward: nn.Module = TrainForward(self.model, t.balance_loss)
        if dist.enabled:
            forward = nn.parallel.DistributedDataParallel(
                forward,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=t.strategy == "advmoe",
            )
        self.strategy = Strategy(t, self.model, forward, self.optimizers, dist)
        self.batch_size = t.batch_size // dist.world_size
        self.steps_per_epoch = self._sampler(0, 0).num_batches
        self.total_steps = t.epochs * self.steps_per_epoch
        self.log = RunLog(out_dir, dist.is_main)
        info = {"step": self.state["global_step"], "epoch": self.state["epoch"], "world_size": dist.world_size}
        self.log.event("resume" if ckpt is not None else "start", **info, device=str(device), config=cfg.to_dict())

    def _load_resume(self, resume) -> dict | None:
        if resume is False or resume is None:
            return None
        path = self.out_dir / "last.pt" if resume is True else Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: checkpoint {str(path)!r} does not exist")
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"cannot resume from {str(path)!r}: not an advmoe training checkpoint")
        saved, now = ckpt["config"], self.cfg.to_dict()
        for section in ("model", "data", "seed"):
            if saved.get(section) != now[section]:
                raise ValueError(
                    f"cannot resume from {str(path)!r}: its {section} config differs from this run's "
                    f"(checkpoint: {saved.get(section)}, now: {now[section]})"
                )
        same_batches = (ckpt["world_size"], saved["train"]["batch_size"]) == (
            self.dist.world_size,
            self.cfg.train.batch_size,
        )
        if ckpt["state"]["batch_in_epoch"] and not same_batches:
            raise ValueError(
                f"cannot resume mid-epoch from {str(path)!r} with a different number of processes or batch size "
                f"(checkpoint: {ckpt['world_size']} x batch {saved['train']['batch_size']}, now: "
                f"{self.dist.world_size} x batch {self.cfg.train.batch_size}); resume from an end-of-epoch checkpoint"
            )
        return ckpt

    def _sampler(self, epoch: int, start_batch: int) -> EpochBatchSampler:
        return EpochBatchSampler(
            len(self.train_set),
            self.batch_size,
            seed=self.cfg.seed,
            epoch=epoch,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            shuffle=True,
            drop_last=True,
            start_batch=start_batch,
        )

    def _save(self, name: str) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # never overwrite a good checkpoint with a broken model
            raise NonFiniteLossError(
                f"parameters became non-finite at step {self.state['global_step']} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); not writing {name} (lower the learning rate)"
            )
        if not self.dist.is_main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "model_args": self.model_args,
            "config": self.cfg.to_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "state": self.state,
            "world_size": self.dist.world_size,
            "rng": capture_rng_state(),
        }
        save_checkpoint(ckpt, self.out_dir / name)

    def fit(self) -> dict:
        t, st = self.cfg.train, self.state
        try:
            while st["epoch"] < t.epochs and not self._done():
                self._train_epoch()
                finished_epoch = st["batch_in_epoch"] == 0
                last = st["epoch"] >= t.epochs or self._done()
                if last or (finished_epoch and st["epoch"] % t.eval_every_epochs == 0):
                    self._end_of_epoch(evaluate=True)
                elif finished_epoch:
                    self._end_of_epoch(evaluate=False)
        except NonFiniteLossError as err:
            self.log.event("error", step=st["global_step"], epoch=st["epoch"], message=str(err))
            raise
        barrier(self.dist)
        self.log.event("stop", step=st["global_step"], epoch=st["epoch"], best_ra=st["best_ra"])
        return {
            "out_dir": str(self.out_dir),
            "global_step": st["global_step"],
            "epoch": st["epoch"],
            "best_ra": st["best_ra"],
            "best_epoch": st["best_epoch"],
            "history": st["history"],
        }

    def _done(self) -> bool:
        return self.cfg.train.max_steps is not None and self.state["global_step"] >= self.cfg.train.max_steps

    def _train_epoch(self) -> None:
        t, d, st = self.cfg.train, self.cfg.data, self.state
        epoch = st["epoch"]
        loader = train_loader(self.train_set, self._sampler(epoch, st["batch_in_epoch"]), d.num_workers)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=st["batch_in_epoch"],
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not (t.progress and self.dist.is_main),
            dynamic_ncols=True,
            leave=False,
        )
        evaluated = [rec for rec in st["history"] if "ra" in rec]
        last_eval = {k: f"{100 * evaluated[-1][k]:.1f}" for k in ("sa", "ra")} if evaluated else {}
        for x, y in loader:
            if self._done():
                break
            step_seed = mix_seed(self.cfg.seed, st["global_step"], self.dist.rank)
            torch.manual_seed(step_seed)
            if d.augment:
                x = augment_batch(x, d.crop_padding, d.flip, torch.Generator().manual_seed(step_seed))
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            lrs = {}
            for name, opt in self.optimizers.items():
                lrs[name] = lr_at(self.opt_cfg[name], st["global_step"], self.total_steps, self.steps_per_epoch)
                set_lr(opt, lrs[name])
            metrics = self.strategy.step(x, y)
            st["global_step"] += 1
            st["batch_in_epoch"] += 1
            sums = st["sums"]
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["n"] = sums.get("n", 0) + 1
            step_usage = usage_shares(self.strategy.last_usage)
            epoch_usage = st.setdefault("usage", {})
            for name, counts in self.strategy.last_usage.items():
                old = epoch_usage.get(name, [0] * len(counts))
                epoch_usage[name] = [a + int(b) for a, b in zip(old, counts.tolist(), strict=True)]
            self._warn_collapse(step_usage, st["global_step"])
            first = st["global_step"] == 1
            if t.log_every_steps and (first or st["global_step"] % t.log_every_steps == 0):
                lr_fields = {f"lr_{k}": v for k, v in lrs.items()}
                extra = {"usage": step_usage} if step_usage else {}
                self.log.event("step", step=st["global_step"], epoch=epoch, **metrics, **lr_fields, **extra)
            bar.update(1)
            postfix = {"loss": f"{metrics['loss']:.3f}", "adv_acc": f"{100 * metrics['adv_acc']:.1f}", **last_eval}
            if epoch_usage:
                postfix["top_expert_%"] = usage_line(usage_shares(epoch_usage))
            bar.set_postfix(**postfix)
            if st["batch_in_epoch"] >= self.steps_per_epoch:
                break
            if t.save_every_steps and st["global_step"] % t.save_every_steps == 0:
                self._save("last.pt")
        bar.close()
        if st["batch_in_epoch"] >= self.steps_per_epoch:
            st["epoch"] += 1
            st["batch_in_epoch"] = 0

    def _warn_collapse(self, usage: dict[str, list[float]], step: int) -> None:
        """Warns (once per layer and run) when a layer sends >= 95% of a step's routing slots to one expert."""
        warned = self.__dict__.setdefault("_collapse_warned", set())
        bad = {name: max(shares) for name, shares in usage.items() if max(shares) >= COLLAPSE_SHARE}
        new = {name: v for name, v in bad.items() if name not in warned}
        if not new:
            return
        warned.update(new)
        self.log.event("collapse_warning", step=step, layers=new)
        if self.dist.is_main:
            text = ", ".join(f"{name} {100 * v:.0f}%" for name, v in new.items())
            warnings.warn(
                f"step {step}: MoE layer(s) send >= {100 * COLLAPSE_SHARE:.0f}% of their samples to one expert: {text} "
                "(raise train.balance_weight, or check the router); warned once per layer",
                RuntimeWarning,
                stacklevel=2,
            )

    def _end_of_epoch(self, evaluate: bool) -> None:
        t, st = self.cfg.train, self.state
        sums = st["sums"]
        n = max(1, sums.get("n", 0))
        record: dict[str, Any] = {
            "epoch": st["epoch"] + st["batch_in_epoch"] / self.steps_per_epoch,
            "step": st["global_step"],
            "train_loss": sums.get("loss", float("nan")) / n,
            "train_adv_acc": sums.get("adv_acc", float("nan")) / n,
        }
        if "router_loss" in sums:
            record["train_router_loss"] = sums["router_loss"] / n
        for name, opt in self.optimizers.items():
            record[f"lr_{name}"] = opt.param_groups[0]["lr"]
        usage = usage_shares(st.get("usage", {}))
        if usage:
            top = {name: max(shares) for name, shares in usage.items()}
            record["max_expert_share"] = max(top.values())
            record["collapsed_layers"] = sum(v >= COLLAPSE_SHARE for v in top.values())
        if st["batch_in_epoch"] == 0:
            st["sums"] = {}
            st["usage"] = {}
        if evaluate:
            loader = eval_batches(
                self.test_set,
                self.batch_size,
                t.eval_samples,
                self.dist.rank,
                self.dist.world_size,
                self.cfg.data.num_workers,
            )
            result = evaluate_sa_ra(self.model, loader, t.eval_attack, self.device, self.dist)
            record.update(sa=result["sa"], ra=result["ra"], eval_samples=result["n"])
        st["history"] = [*st["history"], record]
        self.log.event("epoch", **record, **({"usage": usage} if usage else {}))
        self.log.epochs(st["history"])
        if self.dist.is_main and evaluate:
            tqdm.write(
                f"epoch {record['epoch']:g}: loss {record['train_loss']:.4f}  SA {100 * record['sa']:.2f}%  "
                f"RA {100 * record['ra']:.2f}% (PGD-{t.eval_attack.steps}, {record['eval_samples']} test samples)"
                + (f"  top-expert share per MoE layer (train, %): {usage_line(usage)}" if usage else "")
            )
        improved = evaluate and record["ra"] > st["best_ra"]
        if improved:
            st["best_ra"], st["best_epoch"] = record["ra"], record["epoch"]
        self._save("last.pt")
        if improved:
            self._save("best_ra.pt")


COLLAPSE_SHARE = 0.95


def usage_shares(counts: dict) -> dict[str, list[float]]:
    """Per MoE layer, the share of routing slots each expert got (rounded to 4 digits)."""
    out = {}
    for name, values in counts.items():
        values = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
        total = sum(values)
        if total > 0:
            out[name] = [round(v / total, 4) for v in values]
    return out


def usage_line(usage: dict[str, list[float]], limit: int = 16) -> str:
    """The top expert's share (%) per MoE layer, in forward order, e.g. ``"52/61/70"``."""
    tops = [f"{100 * max(shares):.0f}" for shares in usage.values()]
    line = "/".join(tops[:limit])
    if len(tops) > limit:
        line += f"/... ({len(tops)} layers, max {max(100 * max(s) for s in usage.values()):.0f})"
    return line


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
