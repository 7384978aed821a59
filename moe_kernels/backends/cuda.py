"""The ``cuda`` backend: the C++/CUDA extension ``moe_kernels._C_cuda`` (csrc/cuda/).

The extension registers the CUDA kernels of ``torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd`` and
``..._bwd`` (schema in csrc/sparse_moe_conv2d.cpp, built into ``moe_kernels._C``). Its design: a stable
sort of the routing slots by expert on the device, a gather of each expert's samples, one cuDNN
convolution per expert on its weight slice, and fused CUDA kernels for the epilogue (bias, gate, scatter
into the compact output), the input-gradient scatter and the gate gradient.
"""

from __future__ import annotations

import torch

from moe_kernels.backends.errors import BackendUnavailable
from moe_kernels.compiled_ops import backward, forward

_HOW_TO = (
    "the CUDA backend needs a CUDA build of torch and nvcc; reinstall with "
    "`ADVMOE_CUDA=1 pip install --no-build-isolation -e .` (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, for your GPU)"
)


def load():
    """Returns ``(forward, backward)`` of the CUDA backend, or raises BackendUnavailable with a how-to."""
    if torch.version.cuda is None:
        raise BackendUnavailable(f"torch {torch.__version__} is a CPU-only build: {_HOW_TO}")
    if not torch.cuda.is_available():
        raise BackendUnavailable("the CUDA backend needs a GPU, and torch sees none (torch.cuda.is_available())")
    try:
        # _C defines the torch.ops.moe_kernels_C schema, _C_cuda registers its CUDA kernels.
        from moe_kernels import _C, _C_cuda  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(f"the CUDA extension is not built ({err}); {_HOW_TO}") from None
    return forward, backward
