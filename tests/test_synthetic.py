import hashlib
import subprocess
import sys

import numpy as np
import pytest

from npcpu.data.synthetic import SyntheticClassification
from npcpu.kernels import synthetic as kernels

# ---- plain-NumPy twin of npcpu.kernels.rng and npcpu.kernels.synthetic ----------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def uniform_twin(seed, stream, index):
    """uniform(seed, stream, index) of npcpu.kernels.rng for an array of uint64 counters."""
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(seed) * _GOLDEN + np.uint64(stream))
        bits = _mix64(key ^ (np.asarray(index, dtype=np.uint64) * _GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def normal_twin(seed, stream, index):
    index = np.asarray(index, dtype=np.uint64)
    u1 = 1.0 - uniform_twin(seed, stream, np.uint64(2) * index)
    u2 = uniform_twin(seed, stream, np.uint64(2) * index + np.uint64(1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def batch_twin(seed, global_indices, w1, w2, b2, label_noise):
    """The formula of npcpu.kernels.synthetic, written with whole-array NumPy."""
    input_dim, num_classes = w1.shape[1], w2.shape[0]
    g = np.asarray(global_indices, dtype=np.uint64)
    counters = g[:, None] * np.uint64(input_dim) + np.arange(input_dim, dtype=np.uint64)
    x = normal_twin(seed, kernels.FEATURES, counters).astype(np.float32)
    logits = np.tanh(x.astype(np.float64) @ w1.T) @ w2.T + b2
    y = np.argmax(logits, axis=1)
    noisy = uniform_twin(seed, kernels.NOISE_DECIDE, g) < label_noise
    random_class = np.minimum((uniform_twin(seed, kernels.NOISE_CLASS, g) * num_classes)
                              .astype(np.int64), num_classes - 1)
    return x, np.where(noisy, random_class, y)


# ---- kernels against the twin ----------------------------------------------------------------


def test_fill_normal_matches_twin(num_threads):
    out = np.empty(1001)
    kernels.fill_normal(5, kernels.TEACHER, out)
    np.testing.assert_allclose(out, normal_twin(5, kernels.TEACHER, np.arange(1001)),
                               rtol=1e-14, atol=1e-14)  # libm log/cos may differ by an ulp


def test_teacher_logits_match_twin(num_threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 13)).astype(np.float32)
    w1, w2, b2 = rng.standard_normal((7, 13)), rng.standard_normal((5, 7)), rng.standard_normal(5)
    logits = np.empty((37, 5))
    kernels.teacher_logits(x, w1, w2, b2, logits)
    np.testing.assert_allclose(logits, np.tanh(x.astype(np.float64) @ w1.T) @ w2.T + b2,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_noise", [0.0, 0.3])
def test_batch_kernel_matches_twin(num_threads, label_noise):
    ds = SyntheticClassification(1000, 13, 5, seed=3, hidden=7, label_noise=label_noise,
                                 offset=12345)
    indices = np.random.default_rng(1).integers(0, len(ds), 37)
    x, y = ds.batch(indices)
    x_twin, y_twin = batch_twin(3, indices + 12345, ds._w1, ds._w2, ds._b2, label_noise)
    assert x.dtype == np.float32 and x.shape == (37, 13)
    assert y.dtype == np.int64 and y.shape == (37,)
    np.testing.assert_allclose(x, x_twin, rtol=1e-6, atol=0)  # float32 of the same normals
    np.testing.assert_array_equal(y, y_twin)


# ---- determinism and random access ------------------------------------------------------------


def _fingerprint(x, y):
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def test_same_index_same_sample_in_any_batch_and_order(num_threads):
    ds = SyntheticClassification(500, 31, 7, seed=11, label_noise=0.1)
    x_all, y_all = ds.batch(np.arange(500))
    perm = np.random.default_rng(2).permutation(500)[:123]
    x_perm, y_perm = ds.batch(perm)
    np.testing.assert_array_equal(x_perm, x_all[perm])
    np.testing.assert_array_equal(y_perm, y_all[perm])
    x_one, y_one = ds[perm[0]]
    np.testing.assert_array_equal(x_one, x_all[perm[0]])
    assert y_one == y_all[perm[0]]
    x_last, _ = ds[-1]
    np.testing.assert_array_equal(x_last, x_all[499])


def test_offset_and_subset_continue_the_stream():
    whole = SyntheticClassification(300, 9, 4, seed=2)
    tail = SyntheticClassification(100, 9, 4, seed=2, offset=200)
    x_all, y_all = whole.batch(np.arange(300))
    for part in (tail, whole.subset(200, 300)):
        x, y = part.batch(np.arange(100))
        np.testing.assert_array_equal(x, x_all[200:])
        np.testing.assert_array_equal(y, y_all[200:])


def test_same_sample_in_another_process():
    indices = [5, 17, 3, 999]
    ds = SyntheticClassification(1000, 33, 6, seed=7, label_noise=0.2)
    expected = _fingerprint(*ds.batch(np.array(indices)))
    code = (
        "import hashlib, numpy as np\n"
        "from npcpu.data.synthetic import SyntheticClassification\n"
        "ds = SyntheticClassification(1000, 33, 6, seed=7, label_noise=0.2)\n"
        f"x, y = ds.batch(np.array({indices}))\n"
        "print(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == expected


def test_different_seeds_differ():
    a = SyntheticClassification(200, 16, 5, seed=0).batch(np.arange(200))
    b = SyntheticClassification(200, 16, 5, seed=1).batch(np.arange(200))
    assert not np.any(a[0] == b[0])
    assert np.mean(a[1] == b[1]) < 0.5


# ---- statistics -----------------------------------------------------------------------------


def test_features_are_standard_normal_and_classes_balanced():
    num_classes = 10
    x, y = SyntheticClassification(20_000, 20, num_classes, seed=4).batch(np.arange(20_000))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    frequency = np.bincount(y, minlength=num_classes) / len(y)
    assert frequency.min() > 0.6 / num_classes and frequency.max() < 1.4 / num_classes, frequency


@pytest.mark.parametrize("label_noise", [0.1, 0.5])
def test_label_noise_fraction(label_noise):
    n, num_classes = 20_000, 8
    clean = SyntheticClassification(n, 12, num_classes, seed=5).batch(np.arange(n))[1]
    noisy = SyntheticClassification(n, 12, num_classes, seed=5,
                                    label_noise=label_noise).batch(np.arange(n))[1]
    changed = np.mean(clean != noisy)
    assert abs(changed - label_noise * (1 - 1 / num_classes)) < 0.015


def test_learnable_by_a_linear_classifier():
    """Least squares on one-hot targets, fitted on 4,000 samples, tested on the next 2,000."""
    num_classes = 5
    whole = SyntheticClassification(6000, 20, num_classes, seed=6, hidden=16)
    x, y = whole.batch(np.arange(6000))
    features = np.c_[x, np.ones(len(x))].astype(np.float64)
    weights = np.linalg.lstsq(features[:4000], np.eye(num_classes)[y[:4000]], rcond=None)[0]
    accuracy = np.mean(np.argmax(features[4000:] @ weights, axis=1) == y[4000:])
    assert accuracy > 2.5 / num_classes  # chance is 1 / num_classes


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error", [
    (dict(size=0), ValueError),
    (dict(input_dim=-1), ValueError),
    (dict(num_classes=1), ValueError),
    (dict(size=2.5), TypeError),
    (dict(label_noise=1.5), ValueError),
    (dict(label_noise="0.1"), TypeError),
    (dict(offset=-1), ValueError),
])
def test_bad_arguments(kwargs, error):
    args = dict(size=10, input_dim=4, num_classes=3) | kwargs
    with pytest.raises(error, match="SyntheticClassification"):
        SyntheticClassification(**args)


def test_bad_indices():
    ds = SyntheticClassification(10, 4, 3)
    with pytest.raises(IndexError, match="index 10 is out of range"):
        ds.batch([1, 10])
    with pytest.raises(IndexError, match="out of range"):
        ds[-11]
    with pytest.raises(TypeError, match="integers"):
        ds.batch([0.5])
    with pytest.raises(ValueError, match="subset"):
        ds.subset(5, 5)
