"""Recording what a forward pass decided: an explicit context that the MoE modules report to.

``with record_routing() as recorder: model(x)`` collects, per module that ran inside the context, the
experts it used and the ``Routing`` its own router produced. Modules report with :func:`report_routing`
(``SparseMoEConv2d`` and ``RoutedModel`` do, as part of their forward); outside a ``record_routing`` context
reporting does nothing. The active recorder is a ``contextvars.ContextVar``, so nested contexts see only
their own reports (the outer one is restored on exit) and threads do not share one.
``advmoe.nn.forward_with_aux`` is the usual way in.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from advmoe.nn.routing import Routing

__all__ = ["LayerRecord", "RoutingRecorder", "record_routing", "report_routing"]


@dataclass
class LayerRecord:
    """What one module reported during a recorded forward (the last report wins if it ran twice).

    Attributes:
        expert_idx: (B, k) int64 experts the layer used, detached; None if it reported none.
        router: the ``Routing`` the module's own router produced; None when the routing came from elsewhere
            (a model-level router handed down, frozen routing) or the module has no router.
    """

    expert_idx: torch.Tensor | None = None
    router: Routing | None = None


class RoutingRecorder:
    """The reports of every module that ran inside one :func:`record_routing` context."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[nn.Module, LayerRecord]] = {}

    def get(self, module: nn.Module) -> LayerRecord | None:
        """What ``module`` reported, or None if it reported nothing."""
        entry = self._records.get(id(module))
        return entry[1] if entry is not None else None

    def add(self, module: nn.Module, expert_idx: torch.Tensor | None = None, router: Routing | None = None) -> None:
        """Stores a report of ``module`` (see :func:`report_routing`)."""
        record = self._records.setdefault(id(module), (module, LayerRecord()))[1]
        if expert_idx is not None:
            record.expert_idx = expert_idx.detach()
        if router is not None:
            record.router = router


_ACTIVE: contextvars.ContextVar[RoutingRecorder | None] = contextvars.ContextVar("advmoe_routing", default=None)


@contextlib.contextmanager
def record_routing() -> Iterator[RoutingRecorder]:
    """Collects the routing reports of the modules run inside the context.

    Yields:
        A fresh :class:`RoutingRecorder`; read it with ``recorder.get(module)``.
    """
    recorder = RoutingRecorder()
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def report_routing(module: nn.Module, expert_idx: torch.Tensor | None = None, router: Routing | None = None) -> None:
    """Reports a module's routing to the active :func:`record_routing` context (no-op outside one).

    Args:
        module: the reporting module.
        expert_idx: (B, k) experts it used (stored detached).
        router: the ``Routing`` its own router produced.
    """
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.add(module, expert_idx, router)
