"""advmoe.deploy: inference conversion (``to_sparse``: pathway / grouped / layer forms, BatchNorm and router
folding), CUDA-graph capture (``CapturedModel``), saving/loading deployed models, research-code checkpoint
import (``load_research_checkpoint``)."""

from advmoe.deploy.graphs import CapturedModel, capture
from advmoe.deploy.grouped import GroupedMoE
from advmoe.deploy.layers import ExpertConv2d, FusedMoEConv2d, GroupedExpertConv2d, RoutedExpertConv2d
from advmoe.deploy.research_checkpoint import load_research_checkpoint
from advmoe.deploy.router_fold import fold_router, routing_agreement
from advmoe.deploy.serialize import load_deployed, save_deployed
from advmoe.deploy.to_sparse import PathwayMoE, fold_batchnorms, to_sparse

__all__ = [
    "CapturedModel",
    "ExpertConv2d",
    "FusedMoEConv2d",
    "GroupedExpertConv2d",
    "GroupedMoE",
    "PathwayMoE",
    "RoutedExpertConv2d",
    "capture",
    "fold_batchnorms",
    "fold_router",
    "load_deployed",
    "load_research_checkpoint",
    "routing_agreement",
    "save_deployed",
    "to_sparse",
]
