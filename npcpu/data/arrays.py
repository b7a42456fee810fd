"""A data set held in memory as two arrays, and the index checks every data set's `batch` shares.

The data set contract (npcpu.data.loader.DataLoader relies on it):

    len(dataset)              number of samples
    dataset[i]                (x (*sample_shape) float32, y int), negative i counting from the end
    dataset.batch(indices)    (x (n, *sample_shape) float32, y (n,) int64) for n indices in [0, len)
    dataset.num_classes, dataset.input_dim
"""

from __future__ import annotations

import operator

import numpy as np


def check_indices(indices, size: int, owner: str) -> np.ndarray:
    """`indices` as a 1-D int64 array, each in [0, size); TypeError/IndexError naming `owner`."""
    idx = np.asarray(indices)
    if idx.dtype == bool or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise TypeError(f"{owner}.batch: indices must be integers, got dtype {idx.dtype}")
    if idx.ndim != 1:
        raise ValueError(f"{owner}.batch: indices must be 1-D, got shape {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        bad = int(idx[(idx < 0) | (idx >= size)][0])
        raise IndexError(f"{owner}.batch: index {bad} is out of range [0, {size})")
    return idx


def check_index(i, size: int, owner: str) -> int:
    """An integer index `i` in [-size, size) as one in [0, size), like a Python sequence."""
    try:
        i = operator.index(i)
    except TypeError:
        raise TypeError(f"{owner}: index must be an integer, got {type(i).__name__}") from None
    if not -size <= i < size:
        raise IndexError(f"{owner}: index {i} is out of range for {size} samples")
    return i + size if i < 0 else i


class ArrayDataset:
    """Samples x[i] with integer labels y[i], held in memory.

    Parameters
    ----------
    x : array (N, *sample_shape), floating or integer
        Features; stored as float32 (integer features are converted, e.g. uint8 pixels to 0..255),
        or, with `scale`, kept as the uint8 array they are.
    y : array (N,), integer
        Class labels in [0, num_classes); stored as int64.
    num_classes : int, optional
        Defaults to max(y) + 1.
    scale : float, optional
        For uint8 x only: the features are float32(x) * float32(scale) (MNIST's pixels with
        1 / 255), computed for each batch. x stays uint8 in memory, a quarter of float32's bytes,
        and the compiled training step (npcpu.train.compiled) reads the pixels themselves.

    Raises ValueError for unequal lengths, bad shapes, negative or too large labels, and non-finite
    features (naming the first bad row); TypeError for non-numeric features or non-integer labels.
    """

    def __init__(self, x, y, *, num_classes: int | None = None, scale: float | None = None):
        x, y = np.asarray(x), np.asarray(y)
        if scale is not None:
            if x.dtype != np.uint8:
                raise TypeError(f"ArrayDataset: a scale is for uint8 x (pixels), got x of dtype "
                                f"{x.dtype}")
            if not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale)
                    and scale > 0):
                raise ValueError(f"ArrayDataset: scale must be a positive finite number, "
                                 f"got {scale!r}")
            scale = np.float32(scale)
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.floating)
                                   or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"ArrayDataset: x must have a floating or integer dtype, got {x.dtype}")
        if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"ArrayDataset: y must have an integer dtype, got {y.dtype}")
        if x.ndim < 2:
            raise ValueError(f"ArrayDataset: x must be (N, features...), got shape {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"ArrayDataset: y must be 1-D (N,), got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"ArrayDataset: x has {len(x)} samples but y has {len(y)}")
        if scale is None:
            with np.errstate(over="ignore"):  # an overflow to Inf is reported just below
                x = x.astype(np.float32, copy=False)
        finite_rows = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite_rows.all():
            row = int(np.argmin(finite_rows))
            raise ValueError(f"ArrayDataset: x row {row} contains NaN or Inf "
                             "(or a value too large for float32)")
        y = y.astype(np.int64, copy=False)
        if len(y) and y.min() < 0:
            row = int(np.argmax(y < 0))
            raise ValueError(f"ArrayDataset: labels must be non-negative, y[{row}] = {y[row]}")
        if num_classes is None:
            num_classes = int(y.max()) + 1 if len(y) else 0
        elif len(y) and y.max() >= num_classes:
            row = int(np.argmax(y >= num_classes))
            raise ValueError(f"ArrayDataset: labels must be < num_classes={num_classes}, "
                             f"y[{row}] = {y[row]}")
        self.x, self.y, self.scale = x, y, scale
        self.num_classes = int(num_classes)

    @property
    def input_dim(self) -> int:
        """Number of features per sample (the product of sample_shape)."""
        return int(np.prod(self.x.shape[1:]))

    @property
    def sample_shape(self) -> tuple:
        return self.x.shape[1:]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        i = check_index(i, len(self), "ArrayDataset")
        return self._features(self.x[i]), int(self.y[i])

    def batch(self, indices):
        """(x (n, *sample_shape) float32, y (n,) int64) for the n `indices`, each in [0, len)."""
        idx = check_indices(indices, len(self), "ArrayDataset")
        return self._features(self.x[idx]), self.y[idx]

    def _features(self, stored: np.ndarray) -> np.ndarray:
        """float32 features from stored rows: themselves, or uint8 times the scale."""
        return stored if self.scale is None else np.multiply(stored, self.scale, dtype=np.float32)

    def __repr__(self) -> str:
        return (f"ArrayDataset(samples={len(self)}, sample_shape={self.sample_shape}, "
                f"num_classes={self.num_classes})")
