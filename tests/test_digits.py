import sys

import numpy as np
import pytest

from npcpu.data.digits import load_digits


@pytest.fixture(scope="module")
def sklearn_present():
    pytest.importorskip("sklearn", reason="scikit-learn is absent (pip install 'npcpu[digits]')")


def test_loads_with_stratified_seeded_split(sklearn_present):
    train, test = load_digits(test_fraction=0.2, seed=0)
    assert len(train) + len(test) == 1797
    assert 0.19 < len(test) / 1797 < 0.21
    for ds in (train, test):
        x, y = ds.batch(np.arange(len(ds)))
        assert x.shape == (len(ds), 64) and x.dtype == np.float32 and y.dtype == np.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert ds.num_classes == 10 and set(np.unique(y)) == set(range(10))
    train_counts = np.bincount(train.y, minlength=10)
    test_counts = np.bincount(test.y, minlength=10)
    np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
    again = load_digits(test_fraction=0.2, seed=0)[1]
    np.testing.assert_array_equal(again.x, test.x)
    assert not np.array_equal(load_digits(test_fraction=0.2, seed=1)[1].x, test.x)


def test_bad_test_fraction(sklearn_present):
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_digits(test_fraction=1.0)


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'npcpu\[digits\]'"):
        load_digits()
