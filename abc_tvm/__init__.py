"""abc-tvm: ABC-Net binary neural networks compiled to AND/popcount kernels by Apache TVM."""

from abc_tvm import _inspect_fix

_inspect_fix.install()  # before any TVMScript is parsed: see its docstring

__version__ = "0.1.0"
