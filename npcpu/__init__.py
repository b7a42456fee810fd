"""npcpu: train neural networks on a CPU with NumPy and Numba, no PyTorch and no autograd.

`import npcpu` loads only the backend (BLAS and Numba threading); the subpackages load on first use,
as attributes, the way torch users write them: `npcpu.nn.Linear(3, 2)`, `npcpu.optim.AdamW(...)`.
"""

import importlib

from npcpu import blas_env

blas_env.set_veclib_threads()  # before NumPy loads Accelerate (see npcpu/blas_env.py)

from npcpu import numba_cache  # noqa: E402

numba_cache.install()  # before any kernel is compiled or loaded (see npcpu/numba_cache.py)

from npcpu import backend  # noqa: E402,F401  (chooses the Numba threading layer before any kernel runs)

__version__ = "0.1.0"

SUBPACKAGES = ("data", "models", "nn", "optim", "text", "train")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"npcpu.{name}")  # also binds it as an attribute of npcpu
    raise AttributeError(f"module 'npcpu' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBPACKAGES))
