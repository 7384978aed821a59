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
