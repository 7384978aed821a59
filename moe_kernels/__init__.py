"""moe_kernels: the sparse channel-gated MoE convolution and its backends.

Public API: ``sparse_moe_conv2d``, ``sparse_moe_conv2d_ref``, ``available_backends``,
``group_by_expert``, ``expert_usage``, ``BackendUnavailable``, ``RoutingPlan`` (the routing slots grouped
by expert, built once per forward and shared by the MoE layers of one routing).
"""

from moe_kernels.backends import BackendUnavailable, available_backends, unavailable_reason
from moe_kernels.op import sparse_moe_conv2d
from moe_kernels.plan import RoutingPlan
from moe_kernels.reference import sparse_moe_conv2d_backward_ref, sparse_moe_conv2d_ref
from moe_kernels.routing import ExpertGroups, expert_usage, group_by_expert

__all__ = [
    "BackendUnavailable",
    "ExpertGroups",
    "RoutingPlan",
    "available_backends",
    "expert_usage",
    "group_by_expert",
    "sparse_moe_conv2d",
    "sparse_moe_conv2d_backward_ref",
    "sparse_moe_conv2d_ref",
    "unavailable_reason",
]
