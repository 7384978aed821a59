"""``advmoe train``: adversarial training from a YAML config (``advmoe.train.train``)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]


HELP = "adversarially train a model (PGD-AT, TRADES, MoE-AT, AdvMoE)"
DESCRIPTION = "Train from a YAML config; trailing section.key=value arguments override config values."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``advmoe train`` options."""
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--out", help="run directory (default: runs/<config file stem>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run: from OUT/last.pt, or from the given checkpoint",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (same as device=...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.epochs=5")


def run(args: argparse.Namespace) -> int:
    """Runs ``advmoe train`` with the parsed arguments; returns the exit status."""
    from advmoe.train import load_experiment_config, train

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    cfg = load_experiment_config(args.config, overrides)
    out = args.out or str(Path("runs") / (Path(args.config).stem if args.config else "default"))
    summary = train(cfg, out, resume=args.resume)
    best = summary["best_ra"]
    print(
        f"done: {summary['global_step']} steps, best RA "
        f"{'n/a' if best < 0 else f'{100 * best:.2f}%'} (epoch {summary['best_epoch']}); outputs in {out}"
    )
    return 0
