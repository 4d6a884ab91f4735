"""Fused Triton kernels, installed under the import name ``swiftkv_kernels``.

(The folder is not importable as ``kernels``: that name belongs to a PyPI package transformers probes for.)
Each kernel comes with a PyTorch reference; the models fall back to the reference where Triton or CUDA is missing.
"""
