"""Shared pieces of the Triton kernels: how they multiply per dtype, and whether they are interpreted.

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels compute their dots in the accumulator precision
(the interpreter's low-precision ``tl.dot`` is not trustworthy). On a GPU fp16/bf16 dots run natively
with fp32 accumulation; fp32 dots use TF32 when ``torch.backends.cudnn.allow_tf32`` is on, like
``F.conv2d``. Launch configurations live in ``tuning``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton.language as tl


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class DotSettings:
    """How the kernels multiply for one input dtype.

    Attributes:
        acc_dtype: the accumulator (fp32, or fp64 for fp64 inputs).
        upcast: convert the loaded operands to ``acc_dtype`` before ``tl.dot``.
        input_precision: ``tl.dot`` precision for fp32 operands ("tf32" or "ieee").
    """

    acc_dtype: tl.dtype
    upcast: bool
    input_precision: str


def dot_settings(dtype: torch.dtype) -> DotSettings:
    """Accumulator and dot precision for inputs of ``dtype``."""
    if dtype == torch.float64:
        return DotSettings(tl.float64, True, "ieee")
    if interpreted():
        return DotSettings(tl.float32, True, "ieee")
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return DotSettings(tl.float32, False, "tf32" if tf32 else "ieee")


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the accumulation buffers (atomics, partial sums) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
