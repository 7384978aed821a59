"""Triton kernels of ``sparse_moe_conv2d`` (the ``triton`` backend; entry point ``moe_kernels.backends.triton``).

Modules: ``schedule`` (tile table, pure torch), ``packing`` (cached per-expert weight packs),
``common`` (dot precision per dtype), ``tuning`` (launch configurations, tuned tables, auto choice),
``forward_nhwc`` / ``dgrad_nhwc`` / ``wgrad_reduce`` (the kernels), ``launcher`` (layouts, grids,
tables), ``spec`` (launches as data), ``compile_check`` (compiles for an NVIDIA target without a GPU),
``tune`` (one-time tuning on a GPU). Only ``schedule`` can be imported without triton. See docs/triton.md.
"""
