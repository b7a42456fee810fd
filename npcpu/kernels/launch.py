"""Which kernel runs a small piece of work: the parallel one, or its serial twin on this thread.

A prange launch wakes Numba's other threads and joins them; for a small array that costs more
than the threads save, and when the other cores are busy the launch waits for a time slice. So the
kernels that small models call every step (the optimizers' updates, the bias passes of a linear
layer, the cross-entropy) each have a `*_serial` twin that runs the same per-block or per-row code
in a plain loop, and the caller picks one by the work's size. The twins give the same bits.
"""

PARALLEL_ELEMENTS = 1 << 15
"""Work on fewer elements runs serially (the size of a tensor, or of a layer's (N, M) output)."""


def for_size(parallel_kernel, serial_kernel, n: int):
    """The kernel for work on n elements: `serial_kernel` under PARALLEL_ELEMENTS."""
    return parallel_kernel if n >= PARALLEL_ELEMENTS else serial_kernel
