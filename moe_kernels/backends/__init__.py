"""Registry of ``sparse_moe_conv2d`` backends and the ``backend="auto"`` choice.

A backend is a pair of functions on one ``moe_kernels.call.ConvCall`` (the call's arguments):
``forward(call) -> y`` and ``backward(grad_out, call, needs) -> (grad_x, grad_weight, grad_bias, grad_gate)``,
the devices it serves, and a probe that says whether it is present and, if not, how to get it.
The arguments reaching a backend are already validated.

One module per backend in this package (``reference``, ``cpu``, ``cuda``, ``triton``, ``slices``), each
with a ``load()`` returning ``(forward, backward)`` or raising ``BackendUnavailable`` (``errors``); this
registry imports them only when a backend is first asked for, and they import nothing from it at import
time.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_kernels.backends.errors import BackendUnavailable


@dataclass(frozen=True)
class Backend:
    """One implementation of the op.

    Attributes:
        name: the string users pass as ``backend=``.
        devices: device types it runs on ("cpu", "cuda").
        load: returns ``(forward, backward)``; raises ``BackendUnavailable`` with a how-to if absent.
        uses_plan: whether its functions use the ``RoutingPlan`` passed as ``plan=`` (the op then builds one
            when the caller passed none); the compiled cpu/cuda kernels group the slots themselves.
    """

    name: str
    devices: tuple[str, ...]
    load: Callable[[], tuple[Callable, Callable]]
    uses_plan: bool = False


def _module_loader(module: str) -> Callable[[], tuple[Callable, Callable]]:
    """``load`` of the backend module ``moe_kernels.backends.<module>``, imported on first use (so a missing
    compiled extension or triton costs nothing until that backend is asked for)."""

    def load():
        return importlib.import_module(f"moe_kernels.backends.{module}").load()

    return load


_BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", ("cpu", "cuda"), _module_loader("reference"), uses_plan=True),
    "cpu": Backend("cpu", ("cpu",), _module_loader("cpu")),
    "triton": Backend("triton", ("cuda", "cpu"), _module_loader("triton"), uses_plan=True),
    "cuda": Backend("cuda", ("cuda",), _module_loader("cuda")),
    "slices": Backend("slices", ("cpu", "cuda"), _module_loader("slices"), uses_plan=True),
}

# Order of preference of backend="auto" per device type, fastest first, as measured by
# benchmarks/bench_op.py (see the backend table in docs/op.md). The first present one wins.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_loaded: dict[str, tuple[Callable, Callable]] = {}
_failures: dict[str, str] = {}
_warned_fallback: set[str] = set()


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then also run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend(name: str) -> tuple[Callable, Callable]:
    """Returns ``(forward, backward)`` of a backend by name, loading it on first use.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        BackendUnavailable: the backend is not built or usable here (the message says how to fix it).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_BACKENDS)} and 'auto'")
    if name in _loaded:
        return _loaded[name]
    if name in _failures:
        raise BackendUnavailable(_failures[name])
    try:
        fns = _BACKENDS[name].load()
    except BackendUnavailable as err:
        _failures[name] = str(err)
        raise
    _loaded[name] = fns
    return fns


def backend_uses_plan(name: str) -> bool:
    """Whether backend ``name`` (a concrete one, not "auto") takes a ``RoutingPlan``."""
    return _BACKENDS[name].uses_plan if name in _BACKENDS else False


def is_available(name: str) -> bool:
    """Whether backend ``name`` is present (built, importable, with a device it can run on)."""
    try:
        get_backend(name)
    except BackendUnavailable:
        return False
    return True


def available_backends() -> list[str]:
    """Names of the backends present on this machine, e.g. ``["reference", "cpu"]``."""
    return [name for name in _BACKENDS if is_available(name)]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` is absent and how to get it, or None if it is present."""
    try:
        get_backend(name)
    except BackendUnavailable as err:
        return str(err)
    return None


def auto_backend(
    x: torch.Tensor, weight: torch.Tensor, num_experts: int, stride: tuple[int, int] = (1, 1)
) -> tuple[str, str]:
    """The backend ``backend="auto"`` picks for this call, and why.

    On a GPU with the Triton backend present, Triton or the cuDNN path by the measurements in the
    tuned table of this GPU (``moe_kernels.backends.triton.auto_choice``); otherwise the first present
    backend of ``AUTO_ORDER[device.type]``.

    Args:
        x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); num_experts: E; stride: pair.

    Returns:
        (backend name, reason in words).
    """
    order = AUTO_ORDER.get(x.device.type, ("reference",))
    present = tuple(c for c in order if is_available(c))
    if x.device.type == "cuda" and "triton" in present:
        from moe_kernels.backends import triton as triton_backend

        return triton_backend.auto_choice(x, weight, num_experts, stride, present)
    first = present[0] if present else "reference"
    return first, f"first present backend of the {x.device.type} order {order}"


def resolve_backend(name: str, device: torch.device, call: tuple | None = None) -> str:
    """Turns ``name`` (a backend or "auto") into a concrete backend that can run on ``device``.

    "auto" takes the first present backend of ``AUTO_ORDER[device.type]``; when it falls back to
    the reference because a compiled backend is missing, it warns once with the how-to. On a GPU,
    with ``call = (x, weight, num_experts, stride)``, "auto" follows ``auto_backend``.

    Raises:
        ValueError: unknown backend, or a backend that does not run on this device.
        BackendUnavailable: an explicitly named backend is not present.
    """
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("reference",))
        if device.type == "cuda" and call is not None and is_available("triton"):
            return auto_backend(*call)[0]
        for candidate in order:
            if is_available(candidate):
                if candidate == "reference" and order[0] != "reference" and device.type not in _warned_fallback:
                    _warned_fallback.add(device.type)
                    warnings.warn(
                        f"sparse_moe_conv2d: no compiled backend for {device.type}, using the slow reference. "
                        + (unavailable_reason(order[0]) or ""),
                        stacklevel=3,
                    )
                return candidate
        return "reference"
    get_backend(name)
    devices = _BACKENDS[name].devices
    if device.type not in devices:
        raise ValueError(f"backend {name!r} runs on {'/'.join(devices)} tensors, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpreter_enabled():
        raise ValueError(
            "backend 'triton' needs CUDA tensors; on CPU it runs only under TRITON_INTERPRET=1 (for tests)"
        )
    return name
