"""npcpu: train neural networks on a CPU with NumPy and Numba, no PyTorch and no autograd."""

from npcpu import backend  # noqa: F401  (chooses the Numba threading layer before any kernel runs)

__version__ = "0.1.0"
