"""Kernels: TE compute for bit-packing and bitserial ABC convolution, and per-target schedules."""
