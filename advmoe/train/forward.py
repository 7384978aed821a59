"""The training forward pass and parameter-group helpers, on top of the ``advmoe.nn`` interface.

:class:`TrainForward` runs ``forward_with_aux`` on one or several input batches inside ONE module call,
so DistributedDataParallel sees a single forward per backward even when a loss needs the clean and the
adversarial batch (TRADES), and so the router logits and load-balancing loss travel through DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from advmoe.nn import expert_parameters, forward_with_aux, moe_layers, router_parameters
from advmoe.nn.routing import balance_loss

__all__ = ["ForwardOut", "TrainForward", "model_mode", "only_trainable", "split_parameters"]

# (logits (B, classes), balance_loss scalar, router name -> (B, E) router logits)
ForwardOut = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class TrainForward(nn.Module):
    """Wraps a model; ``forward(x1, x2, ...)`` returns one :data:`ForwardOut` per input batch.

    The balance loss of an input is ``balance`` (an ``advmoe.nn.routing.balance_loss`` name) averaged over
    the model's routers (0 for a dense model). After each call, ``usage`` maps every MoE layer name to the
    (E,) int64 count of routing slots each expert received, summed over the call's inputs.

    Args:
        model: the bare model.
        balance: "entropy" or "switch".
    """

    def __init__(self, model: nn.Module, balance: str = "entropy") -> None:
        super().__init__()
        self.model = model
        self.balance = balance
        self.usage: dict[str, torch.Tensor] = {}
        self._num_experts = {name: layer.num_experts for name, layer in moe_layers(model)}

    def forward(self, *inputs: torch.Tensor) -> tuple[ForwardOut, ...]:
        outs = []
        usage: dict[str, torch.Tensor] = {}
        for x in inputs:
            logits, aux = forward_with_aux(self.model, x)
            losses = []
            for name, scores in aux.router_logits.items():
                layer = name[: -len(".router")] if name.endswith(".router") else None
                idx = aux.routing.get(layer) if layer is not None else next(iter(aux.routing.values()), None)
                if idx is None:  # routing frozen or recorded elsewhere: the router's own top choice
                    idx = scores.detach().argmax(1, keepdim=True)
                losses.append(balance_loss(self.balance, scores, idx))
            balance = torch.stack(losses).mean() if losses else logits.new_zeros((), dtype=torch.float32)
            for name, idx in aux.routing.items():
                counts = torch.bincount(idx.reshape(-1), minlength=self._num_experts.get(name, 0)).cpu()
                usage[name] = usage[name] + counts if name in usage else counts
            outs.append((logits, balance, dict(aux.router_logits)))
        self.usage = usage
        return tuple(outs)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(router parameters, all other parameters) of a model, checked to partition its parameters.

    Raises:
        RuntimeError: the two groups overlap or miss a parameter (an ``advmoe.nn`` contract violation).
    """
    routers = list(router_parameters(model))
    experts = list(expert_parameters(model))
    rid, eid = {id(p) for p in routers}, {id(p) for p in experts}
    all_ids = {id(p) for p in model.parameters()}
    if rid & eid or (rid | eid) != all_ids:
        raise RuntimeError("router_parameters and expert_parameters must partition the model's parameters")
    return routers, experts


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Sequence[nn.Parameter], enabled: bool = True) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``model`` not in ``params``.

    Saves the backward cost of the frozen group (e.g. expert weight gradients during a router step).
    Disabled under DDP, whose reducer expects the same parameters to require gradients every step.
    """
    if not enabled:
        yield
        return
    keep = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextlib.contextmanager
def model_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train/eval mode and restore every submodule's previous mode afterwards."""
    previous = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, was_training in previous:
            m.training = was_training
