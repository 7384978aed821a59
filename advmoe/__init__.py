"""advmoe: robust, genuinely sparse Mixture-of-Experts CNNs.

Subpackages: ``advmoe.nn`` (SparseMoEConv2d, routers), ``advmoe.models`` (model zoo),
``advmoe.attacks``, ``advmoe.train``, ``advmoe.eval``, ``advmoe.data``, ``advmoe.deploy``,
``advmoe.flops``; the op itself lives in the top-level package ``moe_kernels``.
"""

__version__ = "0.1.0"
