"""Command line: ``advmoe train|eval|convert|bench|demo``, one module per subcommand in this package.

Examples::

    advmoe train --config configs/digits_advmoe.yaml --out runs/digits_advmoe train.epochs=3
    advmoe train --config configs/digits_advmoe.yaml --out runs/digits_advmoe --resume
    torchrun --nproc_per_node=2 -m advmoe train --config configs/cifar10_resnet18_advmoe.yaml --out runs/r18
    advmoe eval runs/digits_advmoe/best_ra.pt --output eval.json max_samples=500 attacks=[pgd_ce,pgd_cw]
    advmoe demo                                      # the main job: train, convert, measure (a few minutes)
    advmoe convert runs/digits_advmoe/best_ra.pt --out deployed.pt --export deployed.pt2
    advmoe convert research_r18.pth --arch resnet18_cifar --num-experts 2 --ratio 0.5 --out r18_deployed.pt
    advmoe bench --models resnet18_cifar --batch 1 16 64

Each subcommand module has ``HELP`` and ``DESCRIPTION``, ``add_arguments(parser)`` (its options; shared ones
come from :mod:`advmoe.cli.options`) and ``run(args) -> int`` (turns the parsed arguments into a library call).
Errors a user can fix (bad config keys, missing files, unsafe checkpoints, non-finite losses) print one
message and exit with status 2 (bad input) or 1 (the run failed), without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from advmoe.cli import bench, convert, demo, eval, train

__all__ = ["build_parser", "main"]

SUBCOMMANDS = {"train": train, "eval": eval, "convert": convert, "bench": bench, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    """The ``advmoe`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="advmoe", description="Robust, genuinely sparse MoE-CNNs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,...}")
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``advmoe`` console script and ``python -m advmoe``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options (argparse only collects one positional run)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from advmoe.checkpoint import UnsafeCheckpointError
    from advmoe.train.losses import NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as err:
        print(f"advmoe {args.command}: stopped: {err} (the last good checkpoint is kept)", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, UnsafeCheckpointError, PermissionError) as err:
        print(f"advmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"advmoe {args.command}: error: {err}", file=sys.stderr)
        return 1
