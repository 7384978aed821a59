"""The ``cpu`` backend: the C++ extension ``moe_kernels._C`` (csrc/cpu/)."""

from __future__ import annotations

from moe_kernels.backends import BackendUnavailable


def load():
    """Returns ``(forward, backward)`` of the C++ CPU backend, or raises BackendUnavailable with a how-to."""
    try:
        from moe_kernels import _C  # noqa: F401  (registers torch.ops.moe_kernels_C.*)
    except ImportError as err:
        raise BackendUnavailable(
            f"the C++ CPU backend is not built ({err}). Build it with "
            "`pip install --no-build-isolation -e .` from the repository root (torch must be installed first)."
        ) from None
    raise BackendUnavailable("the C++ CPU backend is not implemented yet")
