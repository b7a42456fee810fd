"""A synthetic classification data set: generated on demand, any sample in O(1), nothing stored.

Features are standard normals from the counter-based rng; labels come from a fixed random teacher
network, y = argmax(w2 @ tanh(w1 @ x) + b2), optionally with label noise. The formula, the rng
streams and the kernel are in npcpu.kernels.synthetic.

Train and eval sets: `seed` chooses the task (the teacher) and the stream of samples; `offset`
chooses where in that stream a data set starts. An eval set is the same definition further along
the stream, so it is the same task on unseen samples:

    train = SyntheticClassification(100_000, 784, 100, seed=0)
    test = SyntheticClassification(10_000, 784, 100, seed=0, offset=100_000)
    # or equally: whole = SyntheticClassification(110_000, ...); whole.subset(100_000, 110_000)

A different seed is a different task (another teacher), not a held-out split.
"""

from __future__ import annotations

import functools

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.data.arrays import check_index, check_indices
from npcpu.kernels import synthetic as kernels

_CALIBRATION_SAMPLES_PER_CLASS = 200
_CALIBRATION_MIN_SAMPLES = 4_000
_CALIBRATION_MAX_SAMPLES = 20_000
_BALANCE_STEPS = 60
_BALANCE_RATE = 0.1


@functools.lru_cache(maxsize=8)
def _teacher(seed: int, input_dim: int, hidden: int, num_classes: int):
    """The teacher's weights w1 (H, D), w2 (C, H) and class-balancing bias b2 (C,), read-only.

    w1 ~ N(0, 1/D) so that w1 @ x ~ N(0, 1) per unit (tanh is neither saturated nor linear);
    the rows of w2 ~ N(0, I) scaled to unit norm so that no class has larger logits by scale.
    b2 is then fitted so that the classes are equally frequent on a calibration sample (features
    from their own rng stream): `_BALANCE_STEPS` fixed-point steps of
    b2 += rate * (log(1/C) - log(frequency)).
    """
    weights = np.empty(hidden * input_dim + num_classes * hidden)
    kernels.fill_normal(seed, kernels.TEACHER, weights)
    w1 = weights[:hidden * input_dim].reshape(hidden, input_dim) / np.sqrt(input_dim)
    w2 = weights[hidden * input_dim:].reshape(num_classes, hidden)
    w2 /= np.linalg.norm(w2, axis=1, keepdims=True)

    m = int(np.clip(_CALIBRATION_SAMPLES_PER_CLASS * num_classes, _CALIBRATION_MIN_SAMPLES,
                    _CALIBRATION_MAX_SAMPLES))
    x = np.empty((m, input_dim), dtype=np.float32)
    kernels.fill_normal(seed, kernels.CALIBRATION, x.reshape(-1))
    logits = np.empty((m, num_classes))
    b2 = np.zeros(num_classes)
    kernels.teacher_logits(x, w1, w2, b2, logits)
    for _ in range(_BALANCE_STEPS):
        frequency = np.bincount(np.argmax(logits + b2, axis=1), minlength=num_classes) / m
        b2 += _BALANCE_RATE * (np.log(1.0 / num_classes) - np.log(np.maximum(frequency, 0.5 / m)))
    for a in (w1, w2, b2):
        a.setflags(write=False)
    return w1, w2, b2


class SyntheticClassification:
    """`size` samples (x float32 (input_dim,), y in [0, num_classes)) of a learnable random task.

    Parameters
    ----------
    size : int
        Number of samples.
    input_dim : int
        D, features per sample (standard normal).
    num_classes : int
        C >= 2.
    seed : int
        Chooses the teacher and the sample stream (see the module docstring for splits).
    label_noise : float in [0, 1]
        Fraction of samples whose label is replaced by a uniformly random class (which may equal
        the teacher's class: the fraction of changed labels is label_noise * (1 - 1/C)).
    hidden : int
        H, the teacher's hidden width.
    offset : int
        Sample i of this data set is sample offset + i of the stream.

    Notes
    -----
    The teacher is y = argmax(w2 @ tanh(w1 @ x) + b2) with b2 fitted so that classes are about
    equally frequent. For D=784, C=100, H=64 (the mlp52m workload), softmax regression trained by
    SGD (batch 128, lr 0.05) reaches 49% test accuracy after 1,000 steps and 63% after 5,000
    (chance: 1%): learnable, far from solved.
    """

    def __init__(self, size: int, input_dim: int, num_classes: int, seed: int = 0, *,
                 label_noise: float = 0.0, hidden: int = 64, offset: int = 0):
        owner, below_2_63 = "SyntheticClassification", 2**63  # each is hashed as a uint64 counter
        self.size = check_int(owner, "size", size, 1, below_2_63)
        self.input_dim = check_int(owner, "input_dim", input_dim, 1, below_2_63)
        self.num_classes = check_int(owner, "num_classes", num_classes, 2, below_2_63)
        self.hidden = check_int(owner, "hidden", hidden, 1, below_2_63)
        self.offset = check_int(owner, "offset", offset, 0, below_2_63)
        self.seed = check_int(owner, "seed", seed, 0, below_2_63)
        self.label_noise = check_real(owner, "label_noise", label_noise, low=0.0, high=1.0)
        self._w1, self._w2, self._b2 = _teacher(self.seed, self.input_dim, self.hidden,
                                                self.num_classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        i = check_index(i, self.size, "SyntheticClassification")
        x, y = self.batch(np.array([i]))
        return x[0], int(y[0])

    def batch(self, indices):
        """(x (n, input_dim) float32, y (n,) int64) for the n `indices`, each in [0, size)."""
        idx = check_indices(indices, self.size, "SyntheticClassification")
        x = np.empty((idx.size, self.input_dim), dtype=np.float32)
        y = np.empty(idx.size, dtype=np.int64)
        kernels.synthetic_batch(self.seed, idx + self.offset, self._w1, self._w2, self._b2,
                                self.label_noise, x, y)
        return x, y

    def subset(self, start: int, stop: int) -> "SyntheticClassification":
        """Samples [start, stop) of this data set, as a data set of its own (same teacher)."""
        if not 0 <= start < stop <= self.size:
            raise ValueError(f"SyntheticClassification.subset: need 0 <= start < stop <= "
                             f"{self.size}, got start={start}, stop={stop}")
        return SyntheticClassification(stop - start, self.input_dim, self.num_classes, self.seed,
                                       label_noise=self.label_noise, hidden=self.hidden,
                                       offset=self.offset + start)

    def __repr__(self) -> str:
        return (f"SyntheticClassification(size={self.size}, input_dim={self.input_dim}, "
                f"num_classes={self.num_classes}, seed={self.seed}, "
                f"label_noise={self.label_noise}, hidden={self.hidden}, offset={self.offset})")
