"""Numba kernels: pure functions over arrays, no classes, no state. See DESIGN.md, "Kernels"."""
