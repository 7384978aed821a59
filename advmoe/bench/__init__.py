"""advmoe.bench: the model benchmark behind ``advmoe bench`` (``run_benchmark``), its timing helpers and the
research code's masked MoE baseline (``to_masked``)."""

from advmoe.bench.costs import cost_table
from advmoe.bench.masked import MaskedMoEConv2d, to_masked
from advmoe.bench.models import DEFAULT_MODELS, IdealModel, balance_router, flops_per_image, run_benchmark
from advmoe.bench.report import markdown_table, write_results
from advmoe.bench.timing import device_slug, time_interleaved

__all__ = [
    "DEFAULT_MODELS",
    "IdealModel",
    "MaskedMoEConv2d",
    "balance_router",
    "cost_table",
    "device_slug",
    "flops_per_image",
    "markdown_table",
    "run_benchmark",
    "time_interleaved",
    "to_masked",
    "write_results",
]
