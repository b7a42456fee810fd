"""Numba kernels: pure functions over arrays, no classes, no state. See docs/DESIGN.md, "Kernels"."""
