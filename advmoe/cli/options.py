"""Argument groups shared by several ``advmoe`` subcommands, each defined once."""

from __future__ import annotations

import argparse

from advmoe.checkpoint import ResearchSpec

__all__ = ["add_research_arguments", "command_line", "research_spec"]


def add_research_arguments(p: argparse.ArgumentParser) -> None:
    """``--arch --num-experts --ratio --num-classes``: how to rebuild a research-code checkpoint."""
    p.add_argument("--arch", help="research-code checkpoint: architecture name, e.g. resnet18_cifar")
    p.add_argument("--num-experts", type=int, default=2, help="research-code checkpoint: E (default 2)")
    p.add_argument("--ratio", type=float, default=0.5, help="research-code checkpoint: width ratio (default 0.5)")
    p.add_argument("--num-classes", type=int, default=10, help="research-code checkpoint: classes (default 10)")


def research_spec(args: argparse.Namespace) -> ResearchSpec | None:
    """The :class:`~advmoe.checkpoint.ResearchSpec` given by :func:`add_research_arguments`' options (None
    without ``--arch``)."""
    if args.arch is None:
        return None
    return ResearchSpec(args.arch, args.num_experts, args.ratio, args.num_classes)


def command_line(name: str, args: argparse.Namespace) -> str:
    """The ``advmoe`` command equivalent to the parsed arguments (recorded with the results)."""
    parts = ["advmoe", name]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)
