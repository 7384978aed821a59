"""Kernel launches as data: launch normally, or record them (for the sm_90 compile check and the tuner).

The NHWC launchers call ``launch(kernel, grid, args, consts, options)``. Inside ``recording()`` the
call is appended to a list instead of running, so ``compile_check`` can run the real launcher on
``meta`` tensors of a realistic shape and compile exactly the specialisations a GPU run would compile
(argument types, 16-divisibility of ints and pointers, ints equal to 1 as constants), without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class LaunchSpec:
    """One kernel launch: the jit function, its grid, runtime arguments, constexprs and options."""

    kernel: object
    grid: tuple
    args: dict
    consts: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


_recorder: list[LaunchSpec] | None = None


def launch(kernel, grid: tuple, args: dict, consts: dict, options: dict) -> None:
    """Runs ``kernel[grid](**args, **consts, **options)``, or records it inside ``recording()``."""
    if _recorder is not None:
        _recorder.append(LaunchSpec(kernel, grid, args, consts, options))
        return
    kernel[grid](**args, **consts, **options)


@contextmanager
def recording() -> Iterator[list[LaunchSpec]]:
    """Collects the launches made inside the block (nothing runs) into the yielded list."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def conv_args(stride, padding, dilation) -> dict:
    """The NHWC kernels' convolution arguments (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w) from int pairs."""
    return dict(
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1]
    )


def nhwc_strides(prefix: str, t) -> dict:
    """``{prefix}b``, ``{prefix}h``, ``{prefix}w``: the batch, row and column strides of a (B, H, W, C) view."""
    return {f"{prefix}b": t.stride(0), f"{prefix}h": t.stride(1), f"{prefix}w": t.stride(2)}


def gate_strides(gate) -> dict:
    """``sgb``, ``sgk``: the strides of a (B, k) gate, zeros without one."""
    sgb, sgk = gate.stride() if gate is not None else (0, 0)
    return dict(sgb=sgb, sgk=sgk)
