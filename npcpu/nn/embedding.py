"""Embedding: a lookup table of learned vectors indexed by integers (torch.nn.Embedding)."""

from __future__ import annotations

import numpy as np
from numba import njit

from npcpu.checks import check_int
from npcpu.nn.module import Module
from npcpu.nn.parameter import Parameter
from npcpu.precision import to_compute


@njit(cache=True)
def scatter_add_rows(dweight, dout, indices, skip_index):
    """dweight[indices[i]] += dout[i] for every i with indices[i] != skip_index.

    dweight (V, D), dout (N, D), indices (N,). Serial on purpose: the work is only N * D
    additions, and a serial loop needs no guard against two tokens with the same index. It
    measured much faster than np.add.at and than a sort + reduceat.
    """
    for i in range(indices.shape[0]):
        row = indices[i]
        if row == skip_index:
            continue
        for d in range(dout.shape[1]):
            dweight[row, d] += dout[i, d]


class Embedding(Module):
    """A table of `num_embeddings` vectors of size `embedding_dim`; forward looks rows up.

    Parameters
    ----------
    num_embeddings : int
        V, the number of rows (the vocabulary size).
    embedding_dim : int
        D, the size of each vector.
    padding_idx : int or None
        A row (negative counts from the end, as in torch) that is initialized to zeros and never
        receives a gradient.
    seed : int or None
        Seed of the generator that draws the initial weight, N(0, 1) as in torch (None: fresh
        entropy).

    Notes
    -----
    forward: indices of any integer shape (...) give y = weight[indices], of shape (..., D).

    backward: with dy (..., D), dL/dweight[v] = sum of dy over the positions whose index is v
    (except v = padding_idx); the indices have no gradient, so backward returns None.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 seed: int | None = None):
        super().__init__()
        num_embeddings = check_int("Embedding", "num_embeddings", num_embeddings, 1)
        self.embedding_dim = check_int("Embedding", "embedding_dim", embedding_dim, 1)
        if padding_idx is not None:
            padding_idx = check_int("Embedding", "padding_idx", padding_idx, -num_embeddings,
                                    num_embeddings) % num_embeddings
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx
        rng = np.random.default_rng(seed)
        weight = rng.standard_normal((self.num_embeddings, self.embedding_dim), dtype=np.float32)
        if padding_idx is not None:
            weight[padding_idx] = 0.0
        self.weight = Parameter(weight)
        self._indices = None  # (N,) int64, flattened
        self._output_shape = None

    def forward(self, indices: np.ndarray) -> np.ndarray:
        indices = self._check_indices(indices)
        out = to_compute(self.weight.data[indices], self.compute_dtype)  # gather 16-bit rows, widen
        self._indices = indices.reshape(-1) if self.training else None
        self._output_shape = out.shape
        return out

    def backward(self, dy: np.ndarray) -> None:
        if self._indices is None:
            raise self.missing_forward()
        indices, self._indices = self._indices, None  # one backward per forward: free the cache
        if self.weight.frozen:
            return None
        dy = self.check_grad_output(dy, self._output_shape).reshape(-1, self.embedding_dim)
        skip = -1 if self.padding_idx is None else self.padding_idx
        scatter_add_rows(self.weight.grad_buffer(), dy, indices, skip)
        self.update_parameters_in_backward()
        return None

    def _check_indices(self, indices) -> np.ndarray:
        """An int64 copy of `indices` (the caller may reuse its array), each in [0, num_embeddings)."""
        if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
            got = indices.dtype if isinstance(indices, np.ndarray) else type(indices).__name__
            raise TypeError(f"{self!r}: expected an integer array of indices, got {got}")
        indices = np.array(indices, dtype=np.int64, order="C")
        bad = (indices < 0) | (indices >= self.num_embeddings)
        if bad.any():
            raise ValueError(f"{self!r}: index {indices[bad][0]} is out of range "
                             f"[0, {self.num_embeddings})")
        return indices

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}"
