"""The ``reference`` backend: ``moe_kernels.reference`` (pure PyTorch), always available."""

from __future__ import annotations


def load():
    """Returns ``(forward, backward)`` of the reference implementation."""
    from moe_kernels.reference import backward, forward

    return forward, backward
