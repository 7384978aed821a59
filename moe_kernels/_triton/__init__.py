"""Triton kernels of ``sparse_moe_conv2d`` (the ``triton`` backend; entry point ``moe_kernels.backends.triton``).

Modules: ``schedule`` (tile table, pure torch), ``packing`` (cached per-expert weight packs),
``common`` (dot precision per dtype), ``tuning`` (launch configurations, tuned tables, auto choice),
``forward_nhwc`` / ``dgrad_nhwc`` / ``wgrad_reduce`` (the kernels), ``kernel_parts`` (the ``@triton.jit``
pieces they share), ``launcher`` (layouts, grids, tables), ``spec`` (launches as data), ``compile_check``
(compiles for an NVIDIA target without a GPU), ``tune`` (one-time tuning on a GPU; its shape table is also the
op benchmark's). Only ``schedule`` and ``tune`` can be imported without triton. See docs/triton.md.
"""
