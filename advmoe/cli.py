"""Command line: ``advmoe train|eval`` (and ``bench|convert|demo`` from ``advmoe.cli_deploy`` when present).

Examples::

    advmoe train --config configs/digits_advmoe.yaml --out runs/digits_advmoe train.epochs=3
    advmoe train --config configs/digits_advmoe.yaml --out runs/digits_advmoe --resume
    torchrun --nproc_per_node=2 -m advmoe train --config configs/cifar10_resnet18_advmoe.yaml --out runs/r18
    advmoe eval runs/digits_advmoe/best_ra.pt --output eval.json max_samples=500 attacks=[pgd_ce,pgd_cw]

Errors a user can fix (bad config keys, missing files, unsafe checkpoints, non-finite losses) print one
message and exit with status 2 (bad input) or 1 (the run failed), without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="adversarially train a model (PGD-AT, TRADES, MoE-AT, AdvMoE)",
        description="Train from a YAML config; trailing section.key=value arguments override config values.",
    )
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
    p.set_defaults(func=_run_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: SA, RA (PGD, AutoAttack), routing robustness, expert usage",
        description="Evaluate a checkpoint with advmoe.eval.evaluate; trailing key=value arguments set EvalConfig "
        "fields (e.g. max_samples=500 pgd_steps=20 attacks=[pgd_ce,pgd_cw]).",
    )
    p.add_argument("checkpoint", help="checkpoint from `advmoe train` (or a research-code checkpoint with --arch)")
    p.add_argument("--config", help="YAML file holding an EvalConfig mapping (or a full config with an eval section)")
    p.add_argument("--data", help="dataset name (default: the checkpoint's training dataset)")
    p.add_argument("--data-root", help="dataset folder")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--output", help="write the result JSON here (default: print it)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--arch", help="research-code checkpoint: architecture name, e.g. resnet18_cifar")
    p.add_argument("--num-experts", type=int, default=2, help="research-code checkpoint: E (default 2)")
    p.add_argument("--ratio", type=float, default=0.5, help="research-code checkpoint: width ratio (default 0.5)")
    p.add_argument("--num-classes", type=int, default=10, help="research-code checkpoint: classes (default 10)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="EvalConfig overrides")
    p.set_defaults(func=_run_eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``advmoe`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="advmoe", description="Robust, genuinely sparse MoE-CNNs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,...}")
    _add_train(sub)
    _add_eval(sub)
    try:
        from advmoe import cli_deploy
    except ImportError:
        cli_deploy = None
    if cli_deploy is not None:
        cli_deploy.add_subcommands(sub)
    return parser


def _run_train(args: argparse.Namespace) -> int:
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


def _eval_config(args: argparse.Namespace):
    from advmoe._config import apply_overrides, from_dict, load_yaml
    from advmoe.eval import EvalConfig

    data = load_yaml(args.config) if args.config else {}
    if "eval" in data and isinstance(data["eval"], dict):
        data = data["eval"]
    overrides = [o[len("eval.") :] if o.startswith("eval.") else o for o in args.overrides]
    return from_dict(EvalConfig, apply_overrides(data, overrides), "eval")


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from advmoe.checkpoint import load_checkpoint
    from advmoe.data import build_dataset
    from advmoe.eval import evaluate, format_result
    from advmoe.train.distributed import resolve_device
    from advmoe.train.trainer import CHECKPOINT_FORMAT, load_trained_model

    cfg = _eval_config(args)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    data_cfg: dict = {}
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        model, ckpt = load_trained_model(args.checkpoint, device)
        data_cfg = ckpt["config"]["data"]
    elif "state_dict" in ckpt and "router" in ckpt:
        if not args.arch:
            raise ValueError(
                "this is a research-code checkpoint: pass --arch (and --num-experts/--ratio/--num-classes)"
            )
        from advmoe.deploy import load_research_checkpoint

        model = load_research_checkpoint(ckpt, args.arch, args.num_experts, args.ratio, args.num_classes).to(device)
    else:
        raise ValueError(f"{args.checkpoint!r} is neither an `advmoe train` checkpoint nor a research-code checkpoint")
    name = args.data or data_cfg.get("name")
    if not name:
        raise ValueError("pass --data NAME (the checkpoint does not say which dataset it was trained on)")
    kwargs = data_cfg.get("kwargs", {}) if name == data_cfg.get("name") else {}
    root = args.data_root or (data_cfg.get("root") if name == data_cfg.get("name") else None)
    dataset = build_dataset(name, root=root, split=args.split, **kwargs)
    torch.manual_seed(cfg.seed)
    result = evaluate(model.eval(), dataset, cfg)
    text = json.dumps(result, indent=2, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(format_result(result))
        print(f"result written to {args.output}")
    else:
        print(text)
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
