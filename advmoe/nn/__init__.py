"""advmoe.nn: the sparse MoE convolution module, routers and model-level helpers.

``SparseMoEConv2d`` is a drop-in for ``nn.Conv2d`` running on ``moe_kernels.sparse_moe_conv2d``;
``ResearchRouter`` / ``PerLayerRouter`` score experts; ``top_k_routing`` makes a ``Routing`` with a
straight-through gate; the helpers (``moe_layers``, ``router_parameters``, ``forward_with_aux``,
``frozen_routing``, ...) are what training, evaluation and deployment use.
"""

from advmoe.nn.routing_record import (
    MoEAux,
    expert_parameters,
    forward_with_aux,
    frozen_routing,
    is_moe,
    moe_layers,
    num_pathways,
    router_parameters,
)
from advmoe.nn.moe_conv import SparseMoEConv2d
from advmoe.nn.routed_model import Normalize, RoutedModel, RoutedSequential
from advmoe.nn.routers import PerLayerRouter, ResearchRouter, Router
from advmoe.nn.routing import GATE_SCORES, Routing, load_balance_loss, top_k_routing

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
    "is_moe",
    "load_balance_loss",
    "moe_layers",
    "num_pathways",
    "router_parameters",
    "top_k_routing",
]
