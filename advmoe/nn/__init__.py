"""advmoe.nn: the sparse MoE convolution module, routers and model-level helpers.

Where things live:

- ``moe_conv``: ``SparseMoEConv2d``, a drop-in for ``nn.Conv2d`` running on ``moe_kernels.sparse_moe_conv2d``.
- ``routers``: the router modules (``ResearchRouter``, ``ImageRouter``, ``PerLayerRouter``, base ``Router``).
- ``routing``: the ``Routing`` decision record, ``top_k_routing`` (straight-through gate), ``gate_gradient`` (the gate's
  gradient on or off: attacks run with it off), the balance losses.
- ``routed_model``: ``RoutedModel`` (base of the zoo models) and ``RoutedSequential``, which hand a model-level
  routing down to the MoE layers.
- ``routing_record``: ``record_routing``, the explicit context the layers report their decisions to;
  ``forward_aux``: ``forward_with_aux`` built on it.
- ``structure`` (``moe_layers``, ``is_moe``, ``num_pathways``), ``parameter_groups`` (``router_parameters``,
  ``expert_parameters``), ``freeze`` (``frozen_routing``): what training, evaluation and deployment use.

``Normalize`` (input normalisation) lives in ``advmoe.models.common``; ``advmoe.nn.Normalize`` still names it.
"""

from advmoe.nn.forward_aux import MoEAux, forward_with_aux
from advmoe.nn.freeze import frozen_routing
from advmoe.nn.moe_conv import SparseMoEConv2d
from advmoe.nn.parameter_groups import expert_parameters, router_parameters
from advmoe.nn.routed_model import RoutedModel, RoutedSequential
from advmoe.nn.routers import PerLayerRouter, ResearchRouter, Router
from advmoe.nn.routing import GATE_SCORES, Routing, gate_gradient, load_balance_loss, top_k_routing
from advmoe.nn.routing_record import record_routing
from advmoe.nn.structure import is_moe, moe_layers, num_pathways

__all__ = [
    "GATE_SCORES",
    "MoEAux",
    "Normalize",
    "PerLayerRouter",
    "ResearchRouter",
    "RoutedModel",
    "RoutedSequential",
    "Router",
    "Routing",
    "SparseMoEConv2d",
    "expert_parameters",
    "forward_with_aux",
    "frozen_routing",
    "gate_gradient",
    "is_moe",
    "load_balance_loss",
    "moe_layers",
    "num_pathways",
    "record_routing",
    "router_parameters",
    "top_k_routing",
]


def __getattr__(name: str):
    # advmoe.models builds on advmoe.nn, so Normalize is imported on first use, not at package import
    if name == "Normalize":
        from advmoe.models.common import Normalize

        return Normalize
    raise AttributeError(f"module 'advmoe.nn' has no attribute {name!r}")
