"""advmoe.deploy: inference conversion (``to_sparse``), saving/loading deployed models, research-code
checkpoint import (``load_research_checkpoint``)."""

from advmoe.deploy.research_checkpoint import load_research_checkpoint
from advmoe.deploy.serialize import load_deployed, save_deployed
from advmoe.deploy.to_sparse import ExpertConv2d, FusedMoEConv2d, PathwayMoE, fold_batchnorms, to_sparse

__all__ = [
    "ExpertConv2d",
    "FusedMoEConv2d",
    "PathwayMoE",
    "fold_batchnorms",
    "load_deployed",
    "load_research_checkpoint",
    "save_deployed",
    "to_sparse",
]
