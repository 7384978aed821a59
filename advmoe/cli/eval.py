"""``advmoe eval``: SA, RA (PGD, AutoAttack), routing robustness and expert usage of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advmoe.cli.options import add_research_arguments, research_spec

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]


HELP = "evaluate a checkpoint: SA, RA (PGD, AutoAttack), routing robustness, expert usage"
DESCRIPTION = (
    "Evaluate a checkpoint with advmoe.eval.evaluate; trailing key=value arguments set EvalConfig "
    "fields (e.g. max_samples=500 pgd_steps=20 attacks=[pgd_ce,pgd_cw])."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``advmoe eval`` options."""
    p.add_argument("checkpoint", help="checkpoint from `advmoe train` (or a research-code checkpoint with --arch)")
    p.add_argument("--config", help="YAML file holding an EvalConfig mapping (or a full config with an eval section)")
    p.add_argument("--data", help="dataset name (default: the checkpoint's training dataset)")
    p.add_argument("--data-root", help="dataset folder")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--output", help="write the result JSON here (default: print it)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_research_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="EvalConfig overrides")


def run(args: argparse.Namespace) -> int:
    """Runs ``advmoe eval`` with the parsed arguments; returns the exit status."""
    import torch

    from advmoe.checkpoint import CHECKPOINT_FORMAT, load_model
    from advmoe.data import build_dataset
    from advmoe.eval import evaluate, format_result, load_eval_config
    from advmoe.train.distributed import resolve_device

    cfg = load_eval_config(args.config, args.overrides)
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, research_spec(args), device)
    data_cfg: dict = ckpt["config"]["data"] if ckpt.get("format") == CHECKPOINT_FORMAT else {}
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
