"""abc-tvm: ABC-Net binary neural networks compiled to AND/popcount kernels by Apache TVM."""

__version__ = "0.1.0"
