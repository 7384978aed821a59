"""The ``triton`` backend (placeholder until the kernels land)."""

from moe_kernels.backends import BackendUnavailable


def load():
    raise BackendUnavailable("the Triton backend is not implemented yet")
