"""The ``cpu`` backend: the C++ extension ``moe_kernels._C`` (csrc/cpu/sparse_moe_conv2d_kernel.cpp).

The kernels are registered as ``torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd`` and ``..._bwd`` for the CPU
dispatch key; ``moe_kernels.compiled_ops`` wraps them in the backend signatures (``moe_kernels.call``)
(shared with the ``cuda`` backend). The C++ side checks every argument again, so calling the torch ops
directly with bad input raises a RuntimeError instead of reading out of bounds.
"""

from __future__ import annotations

import torch

from moe_kernels.backends.errors import BackendUnavailable
from moe_kernels.compiled_ops import backward, forward


def load():
    """Returns ``(forward, backward)`` of the C++ CPU backend, or raises BackendUnavailable with a how-to."""
    try:
        from moe_kernels import _C  # noqa: F401  (registers torch.ops.moe_kernels_C.*)
    except ImportError as err:
        raise BackendUnavailable(
            f"the C++ CPU backend is not built ({err}). Build it with "
            "`pip install --no-build-isolation -e .` from the repository root (torch must be installed first)."
        ) from None
    if not hasattr(torch.ops.moe_kernels_C, "sparse_moe_conv2d_fwd"):
        raise BackendUnavailable(
            "moe_kernels._C was built without the CPU kernels; reinstall with `pip install --no-build-isolation -e .`"
        )
    return forward, backward
