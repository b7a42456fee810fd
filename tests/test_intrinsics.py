"""npcpu.kernels.intrinsics: atomics and the spin barrier, run by real threads at once."""

import threading
import time

import numpy as np
from numba import njit

from npcpu.kernels.intrinsics import atomic_add, atomic_load, barrier_wait, prefetch


@njit(nogil=True)
def _add_many(counter, times):
    for _ in range(times):
        atomic_add(counter, 0, 1)


@njit(nogil=True)
def _rounds(thread, threads, counter, seen, rounds):
    """Each round every thread writes its round number, meets the others, and reads theirs;
    counts the reads that saw a stale value (there must be none)."""
    stale = 0
    for r in range(rounds):
        seen[thread] = r
        barrier_wait(counter, threads, 2 * r)
        for t in range(threads):
            stale += seen[t] != r
        barrier_wait(counter, threads, 2 * r + 1)  # nobody writes round r + 1 before all read r
    return stale


@njit
def _prefetch_then_read(a):
    prefetch(a, 0)
    prefetch(a, a.size - 1)
    return atomic_load(a, a.size - 1)


def _run_together(target, args_of_thread, threads):
    results = [None] * threads

    def run(t):
        results[t] = target(*args_of_thread(t))
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def test_atomic_add_loses_no_update_between_threads():
    counter = np.zeros(1, np.int64)
    _add_many(counter, 1)  # compile before the race
    counter[0] = 0
    _run_together(_add_many, lambda t: (counter, 200_000), 2)
    assert counter[0] == 400_000


def test_barrier_makes_every_write_visible_to_every_thread():
    for threads in (1, 2, 3):
        counter, seen = np.zeros(1, np.int64), np.full(threads, -1, np.int64)
        stale = _run_together(_rounds, lambda t: (t, threads, counter, seen, 20_000), threads)
        assert stale == [0] * threads
        assert counter[0] == (threads * 2 * 20_000 if threads > 1 else 0)


@njit(nogil=True)
def _meet(counter, threads):
    return barrier_wait(counter, threads, 0)


def _meet_after(delay, counter, threads):
    time.sleep(delay)
    return _meet(counter, threads)


def test_barrier_says_which_thread_waited_for_one_that_was_not_running():
    """The thread that arrives first and waits past its spins (the other sleeps 0.2 s, far longer
    than the spins) reports it; the late one does not; one thread never waits."""
    assert _meet(np.zeros(1, np.int64), 1) is False
    counter = np.zeros(1, np.int64)
    assert _run_together(_meet_after, lambda t: (0.2 * t, counter, 2), 2) == [True, False]


def test_prefetch_is_a_hint_and_atomic_load_reads():
    assert _prefetch_then_read(np.arange(5, dtype=np.int64)) == 4
