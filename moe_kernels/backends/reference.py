"""The ``reference`` backend: ``moe_kernels.reference`` (pure PyTorch), always available."""

from __future__ import annotations


def load():
    """Returns ``(forward, backward)`` of the reference implementation."""
    from moe_kernels.reference import sparse_moe_conv2d_backward_ref, sparse_moe_conv2d_ref

    return sparse_moe_conv2d_ref, sparse_moe_conv2d_backward_ref
