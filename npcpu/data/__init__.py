"""Data sets (synthetic on demand, arrays, MNIST IDX files, scikit-learn's digits) and the loader."""

from npcpu.data.arrays import ArrayDataset
from npcpu.data.digits import load_digits
from npcpu.data.loader import DataLoader
from npcpu.data.mnist import load_mnist, read_idx, write_idx
from npcpu.data.synthetic import SyntheticClassification

__all__ = ["ArrayDataset", "DataLoader", "SyntheticClassification", "load_digits", "load_mnist",
           "read_idx", "write_idx"]
