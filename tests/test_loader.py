import threading
import traceback

import numba
import numpy as np
import pytest

from npcpu.data.arrays import ArrayDataset
from npcpu.data.loader import DataLoader
from npcpu.data.synthetic import SyntheticClassification


def _indexed_dataset(n):
    """x[i] = [i, -i], y[i] = i % 3: a batch tells which indices it holds."""
    i = np.arange(n)
    return ArrayDataset(np.stack([i, -i], axis=1).astype(np.float32), i % 3)


def _served_indices(batches):
    return [x[:, 0].astype(np.int64) for x, _ in batches]


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "npcpu-prefetch"]


# ---- ArrayDataset ---------------------------------------------------------------------------


def test_array_dataset_batch_and_item():
    x = np.arange(12, dtype=np.uint8).reshape(4, 3)
    ds = ArrayDataset(x, np.array([0, 2, 1, 2], dtype=np.int32))
    assert len(ds) == 4 and ds.num_classes == 3 and ds.input_dim == 3
    xb, yb = ds.batch([3, 0])
    assert xb.dtype == np.float32 and yb.dtype == np.int64
    np.testing.assert_array_equal(xb, [[9, 10, 11], [0, 1, 2]])
    np.testing.assert_array_equal(yb, [2, 0])
    x1, y1 = ds[-1]
    np.testing.assert_array_equal(x1, [9, 10, 11])
    assert y1 == 2


@pytest.mark.parametrize("x, y, error, message", [
    (np.zeros((3, 2)), np.zeros(2, dtype=int), ValueError, "x has 3 samples but y has 2"),
    (np.zeros((3, 2)), np.zeros(3), TypeError, "y must have an integer dtype"),
    (np.zeros((3, 2), dtype=bool), np.zeros(3, dtype=int), TypeError, "x must have a floating"),
    (np.zeros(3), np.zeros(3, dtype=int), ValueError, r"x must be \(N, features...\)"),
    (np.zeros((3, 2)), np.array([0, -1, 2]), ValueError, r"y\[1\] = -1"),
    (np.array([[0, 1], [np.inf, 2], [np.nan, 0]]), np.zeros(3, dtype=int), ValueError,
     "x row 1 contains NaN or Inf"),
    (np.array([[0.0], [1e300]]), np.zeros(2, dtype=int), ValueError, "x row 1"),
])
def test_array_dataset_validation(x, y, error, message):
    with pytest.raises(error, match=message):
        ArrayDataset(x, y)


def test_array_dataset_keeps_uint8_pixels_with_a_scale():
    x = np.array([[0, 255, 7], [128, 1, 2]], dtype=np.uint8)
    ds = ArrayDataset(x, np.array([1, 0]), scale=1 / 255)
    assert ds.x is x and ds.scale == np.float32(1 / 255)  # no float32 copy of the data
    xb, _ = ds.batch([1, 0])
    assert xb.dtype == np.float32
    np.testing.assert_array_equal(xb, x[[1, 0]].astype(np.float32) * np.float32(1 / 255))
    assert xb[1, 1] == 1.0 and ds[0][0].dtype == np.float32
    np.testing.assert_array_equal(ds[-1][0], xb[0])
    with pytest.raises(TypeError, match="a scale is for uint8 x .pixels., got x of dtype float32"):
        ArrayDataset(x.astype(np.float32), np.array([1, 0]), scale=0.5)
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            ArrayDataset(x, np.array([1, 0]), scale=bad)


def test_array_dataset_num_classes_bound():
    with pytest.raises(ValueError, match=r"num_classes=3, y\[2\] = 3"):
        ArrayDataset(np.zeros((3, 1)), np.array([0, 1, 3]), num_classes=3)


# ---- DataLoader -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("n, batch_size, drop_last", [(103, 10, False), (103, 10, True),
                                                      (100, 10, True), (7, 7, False)])
def test_every_index_once_per_epoch(n, batch_size, drop_last, prefetch):
    loader = DataLoader(_indexed_dataset(n), batch_size, seed=3, drop_last=drop_last,
                        prefetch=prefetch)
    served = _served_indices(loader)
    assert len(served) == len(loader) == (n // batch_size if drop_last else -(-n // batch_size))
    assert all(len(b) == batch_size for b in served[:-1])
    flat = np.concatenate(served)
    assert len(np.unique(flat)) == len(flat)
    if drop_last:
        assert len(flat) == n - n % batch_size
    else:
        np.testing.assert_array_equal(np.sort(flat), np.arange(n))


def test_order_is_a_pure_function_of_seed_and_epoch():
    ds = _indexed_dataset(50)
    a, b = DataLoader(ds, 8, seed=1), DataLoader(ds, 8, seed=1)
    b.set_epoch(4)
    b.set_epoch(2)  # what came before does not matter
    a.set_epoch(2)
    orders = [np.concatenate(_served_indices(loader)) for loader in (a, b)]
    np.testing.assert_array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], DataLoader(ds, 8, seed=1).order(2))
    assert not np.array_equal(a.order(2), a.order(3))
    assert not np.array_equal(a.order(2), DataLoader(ds, 8, seed=2).order(2))
    np.testing.assert_array_equal(a.order(2), a.order(2))
    in_order = np.concatenate(_served_indices(DataLoader(ds, 8, shuffle=False)))
    np.testing.assert_array_equal(in_order, np.arange(50))


def test_kept_orders_are_handed_out_as_copies_and_follow_the_seed():
    ds = _indexed_dataset(50)
    loader = DataLoader(ds, 8, seed=1)
    first = loader.order(2)
    first[:] = 0  # a caller writing into its order changes nobody else's
    np.testing.assert_array_equal(loader.order(2), DataLoader(ds, 8, seed=1).order(2))
    for epoch in (3, 4, 2, 5):  # more epochs than are kept: each drawn again as it was
        np.testing.assert_array_equal(loader.order(epoch), DataLoader(ds, 8, seed=1).order(epoch))
    assert len(loader._orders) == 2
    loader.seed = 7  # the seed changed after the orders were kept
    np.testing.assert_array_equal(loader.order(2), DataLoader(ds, 8, seed=7).order(2))


@pytest.mark.parametrize("rows_of_batch", [None, lambda n: (n // 2, n)])
def test_one_batch_is_the_batch_iteration_serves_without_a_thread(rows_of_batch):
    loader = DataLoader(_indexed_dataset(45), 8, seed=3, prefetch=2, rows_of_batch=rows_of_batch)
    served = list(loader.iter_from(4, 0))
    for b in (0, 3, len(loader) - 1):
        x, y = loader.batch(4, b)
        assert not _prefetch_threads()
        np.testing.assert_array_equal(x, served[b][0])
        np.testing.assert_array_equal(y, served[b][1])
    with pytest.raises(IndexError, match="batch_index 6 is out of range"):
        loader.batch(4, 6)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_mid_epoch_equals_uninterrupted(prefetch):
    ds = SyntheticClassification(95, 6, 3, seed=9)
    loader = DataLoader(ds, 10, seed=5, prefetch=prefetch)
    loader.set_epoch(7)
    uninterrupted = list(loader)
    resumed = list(DataLoader(ds, 10, seed=5, prefetch=prefetch).iter_from(7, 4))
    assert len(resumed) == len(uninterrupted) - 4
    for (x, y), (x_ref, y_ref) in zip(resumed, uninterrupted[4:]):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(loader.batch_indices(7, 4), loader.order(7)[40:50])
    assert list(loader.iter_from(7, len(loader))) == []


def test_dataset_without_batch_is_stacked():
    class Items:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.full(3, i, dtype=np.float32), i

    (x, y), = list(DataLoader(Items(), 5, shuffle=False))
    np.testing.assert_array_equal(x[:, 0], np.arange(5))
    np.testing.assert_array_equal(y, np.arange(5))


class _FailingDataset:
    def __init__(self, fail_at_call):
        self.fail_at_call, self.calls = fail_at_call, 0

    def __len__(self):
        return 100

    def batch(self, indices):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("broken sample")
        return np.zeros((len(indices), 2), dtype=np.float32), np.zeros(len(indices), np.int64)


def test_producer_exception_is_raised_in_consumer_with_its_traceback():
    loader = DataLoader(_FailingDataset(fail_at_call=3), 10, prefetch=2)
    received = 0
    with pytest.raises(RuntimeError, match="broken sample") as info:
        for _ in loader:
            received += 1
    assert received == 2
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "batch" in frames  # the producer thread's frame is kept
    assert not _prefetch_threads()


def test_stopping_early_leaves_no_running_thread():
    loader = DataLoader(SyntheticClassification(1000, 8, 3), 10, prefetch=2)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert not _prefetch_threads()
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert not _prefetch_threads()


def test_no_prefetch_thread_under_workqueue_layer(monkeypatch):
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    iterator = iter(DataLoader(_indexed_dataset(30), 10, prefetch=2))
    next(iterator)
    assert not _prefetch_threads()
    assert len(list(iterator)) == 2


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=2.0), TypeError, "batch_size must be an integer"),
    (dict(prefetch=-1), ValueError, "prefetch must be >= 0"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(batch_size=11, drop_last=True), ValueError, "leaves no batch"),
])
def test_bad_arguments(kwargs, error, message):
    args = dict(batch_size=4) | kwargs
    with pytest.raises(error, match=message):
        DataLoader(_indexed_dataset(10), **args)


def test_bad_epoch_and_batch_index():
    loader = DataLoader(_indexed_dataset(10), 4)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        loader.set_epoch(-1)
    with pytest.raises(ValueError, match="batch_index must be <= 3"):
        loader.iter_from(0, 4)
    with pytest.raises(TypeError, match="dataset must have"):
        DataLoader(object(), 4)
