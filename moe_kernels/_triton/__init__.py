"""Triton kernels of ``sparse_moe_conv2d`` (the ``triton`` backend; entry point ``moe_kernels.backends.triton``).

Modules: ``schedule`` (tile -> expert map, pure torch), ``common`` (shared jit helpers and launch
settings), ``forward`` (implicit-GEMM forward), ``dgrad`` (grad wrt x and the gate), ``wgrad`` (grad wrt
weight and bias), ``compile_check`` (compiles them for an NVIDIA target without a GPU). Only
``schedule`` can be imported without triton.
"""
