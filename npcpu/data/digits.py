"""The 8x8 handwritten digits that scikit-learn ships (1,797 images, UCI ML hand-written digits).

Needs the optional extra: pip install 'npcpu[digits]' (scikit-learn; the data come with the package,
nothing is downloaded).
"""

from __future__ import annotations


import numpy as np

from npcpu.checks import check_real
from npcpu.data.arrays import ArrayDataset


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Sorted (train, test) index arrays: round(test_fraction * count) random samples of each class
    go to test, drawn with np.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[:round(test_fraction * len(members))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_digits(*, test_fraction: float = 0.2, seed: int = 0):
    """(train, test) ArrayDatasets of scikit-learn's digits: x (N, 64) float32 in [0, 1], y 0..9.

    Pixels (0..16 in the source) are divided by 16. The split is stratified (each class keeps its
    share in both parts) and a pure function of `seed`.
    """
    check_real("load_digits", "test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError("load_digits needs scikit-learn: pip install 'npcpu[digits]'") from error
    digits = sklearn_load_digits()
    x = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    train, test = _stratified_split(y, test_fraction, seed)
    return (ArrayDataset(x[train], y[train], num_classes=10),
            ArrayDataset(x[test], y[test], num_classes=10))
