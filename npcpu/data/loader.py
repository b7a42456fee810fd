"""Batches (x, y) from a data set, shuffled per epoch, with a background prefetch thread.

The order of epoch e is a pure function of (seed, e): a permutation drawn with
np.random.Generator(np.random.PCG64([seed, e])). Resuming needs no replay: `iter_from(e, b)`
yields exactly what iterating epoch e would from batch b on.

As in PyTorch's DistributedSampler, the epoch advances only through `set_epoch` (or `iter_from`):
iterating twice without it gives the same order twice. The last two epochs' orders are kept
(`order` hands out copies): a run asks for an epoch's order more than once (the first batch for
the memory estimate, the compiled step's whole epoch), and drawing it costs about as much as a
small model's epoch costs in steps.
"""

from __future__ import annotations

import functools
import queue
import threading

import numba
import numpy as np

from npcpu.checks import check_int

_POLL_SECONDS = 0.05


def _stack_items(dataset, indices: np.ndarray):
    """(x, y) for datasets without .batch: np.stack of dataset[i] for each index."""
    items = [dataset[int(i)] for i in indices]
    return np.stack([x for x, _ in items]), np.asarray([y for _, y in items])


class DataLoader:
    """Iterate over `dataset` in batches of `batch_size` samples.

    Parameters
    ----------
    dataset
        Has `__len__` and `batch(indices) -> (x, y)` (npcpu's data sets), or at least
        `__getitem__(i) -> (x, y)`, in which case items are stacked.
    batch_size : int
    shuffle : bool
        Permute the samples each epoch (see the module docstring); otherwise in index order.
    seed : int
        Seed of the shuffling.
    drop_last : bool
        Leave out the last, smaller batch.
    prefetch : int
        Batches prepared ahead by a background thread (0: no thread, batches made on demand).
        Under Numba's workqueue threading layer, which aborts when two threads launch parallel
        kernels at once, batches are always made on demand.
    rows_of_batch : callable, optional
        `rows_of_batch(n) -> (start, stop)`: serve only rows start..stop-1 of each batch of n
        samples (a data-parallel process's share of the global batch, npcpu.dist). The batches,
        their order and `len()` stay those of the whole data set; only the rows served change.
    """

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, prefetch: int = 2, rows_of_batch=None):
        if not hasattr(dataset, "__len__") or not (hasattr(dataset, "batch")
                                                   or hasattr(dataset, "__getitem__")):
            raise TypeError(f"DataLoader: dataset must have __len__ and batch or __getitem__, "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = check_int("DataLoader", "batch_size", batch_size, 1)
        self.seed = check_int("DataLoader", "seed", seed, 0)
        self.prefetch = check_int("DataLoader", "prefetch", prefetch, 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rows_of_batch = rows_of_batch
        self.epoch = 0
        self._orders: dict[tuple, np.ndarray] = {}  # (seed, epoch, samples) -> order, at most 2
        if len(dataset) == 0:
            raise ValueError("DataLoader: dataset is empty")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"DataLoader: drop_last with batch_size={batch_size} leaves no batch "
                             f"of a dataset of {len(dataset)} samples")

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (its order is a pure function of (seed, epoch))."""
        self.epoch = check_int("DataLoader", "epoch", epoch, 0)

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of epoch `epoch`, in the order they are served."""
        epoch = check_int("DataLoader", "epoch", epoch, 0)
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        key = (self.seed, epoch, n)
        if key not in self._orders:
            if len(self._orders) == 2:
                del self._orders[next(iter(self._orders))]  # the older one
            self._orders[key] = np.random.Generator(np.random.PCG64([self.seed, epoch])
                                                    ).permutation(n)
        return self._orders[key].copy()  # a caller may write into its order

    def batch_size_of(self, batch_index: int) -> int:
        """Samples in batch `batch_index` of the whole data set (the last one may be smaller)."""
        return min(self.batch_size, len(self.dataset) - batch_index * self.batch_size)

    def batch_indices(self, epoch: int, batch_index: int) -> np.ndarray:
        """The sample indices of batch `batch_index` of epoch `epoch` (all its rows)."""
        batch_index = check_int("DataLoader", "batch_index", batch_index, 0)
        if batch_index >= len(self):
            raise IndexError(f"DataLoader: batch_index {batch_index} is out of range for "
                             f"{len(self)} batches")
        start = batch_index * self.batch_size
        return self.order(epoch)[start:start + self.batch_size]

    def batch(self, epoch: int, batch_index: int):
        """Batch `batch_index` of epoch `epoch`, as iterating serves it, made on the calling
        thread (for one batch, starting the prefetch thread costs more than it saves)."""
        return self._make(self.batch_indices(epoch, batch_index))

    def __iter__(self):
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, batch_index: int):
        """Iterate over epoch `epoch` from batch `batch_index` on, 0 <= batch_index <= len(self)."""
        epoch = check_int("DataLoader", "epoch", epoch, 0)
        batch_index = check_int("DataLoader", "batch_index", batch_index, 0)
        if batch_index > len(self):
            raise ValueError(f"DataLoader: batch_index must be <= {len(self)} batches, "
                             f"got {batch_index}")
        batches = self._batches(self.order(epoch), batch_index)
        if self.prefetch == 0 or not _threading_layer_is_thread_safe():
            return batches
        return _prefetched(batches, self.prefetch)

    def _batches(self, order: np.ndarray, first: int):
        for b in range(first, len(self)):
            yield self._make(order[b * self.batch_size:(b + 1) * self.batch_size])

    def _make(self, indices: np.ndarray):
        """(x, y) of a batch of sample indices (this process's rows of it, with rows_of_batch)."""
        if self.rows_of_batch is not None:
            start, stop = self.rows_of_batch(len(indices))
            indices = indices[start:stop]
        make = getattr(self.dataset, "batch", None) or functools.partial(_stack_items, self.dataset)
        return make(indices)

    def __repr__(self) -> str:
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"prefetch={self.prefetch}"
                + (f", rows_of_batch={self.rows_of_batch!r}" if self.rows_of_batch else "") + ")")


def _threading_layer_is_thread_safe() -> bool:
    """False under Numba's workqueue layer (see npcpu.backend for how the layer is chosen)."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer that will start
        layer = numba.config.THREADING_LAYER
    return layer != "workqueue"


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` unless the consumer has stopped; True when it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _prefetched(batches, depth: int):
    """Yield from the generator `batches`, run `depth` items ahead in a background thread.

    An exception in the producer is raised here, in the consumer, with the producer's traceback.
    When the consumer stops early (break, close, garbage collection) the thread is told to stop
    and joined before this generator finishes closing.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    threads = numba.get_num_threads()  # Numba's thread count is per thread: pass the consumer's on

    def produce():
        numba.set_num_threads(threads)
        try:
            for item in batches:
                if not _put(q, ("batch", item), stop):
                    return
            _put(q, ("end", None), stop)
        except BaseException as error:  # noqa: BLE001  (re-raised in the consumer)
            _put(q, ("error", error), stop)
        finally:
            batches.close()

    thread = threading.Thread(target=produce, name="npcpu-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "batch":
                yield item
            elif kind == "end":
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()
