"""The ``cuda`` backend: the C++/CUDA extension ``moe_kernels._C_cuda`` (csrc/cuda/)."""

from __future__ import annotations

import torch

from moe_kernels.backends import BackendUnavailable


def load():
    """Returns ``(forward, backward)`` of the CUDA backend, or raises BackendUnavailable with a how-to."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("the CUDA backend needs a CUDA build of torch and a GPU; none is present")
    try:
        from moe_kernels import _C_cuda  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(
            f"the CUDA extension is not built ({err}). On a machine with a CUDA torch and nvcc run "
            "`ADVMOE_CUDA=1 pip install --no-build-isolation -e .`."
        ) from None
    raise BackendUnavailable("the CUDA backend is not implemented yet")
