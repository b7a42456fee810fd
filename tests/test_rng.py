import numpy as np
from numba import njit, prange

from npcpu.kernels.rng import hash_index, normal, uniform


@njit(parallel=True, cache=True)
def _draw(seed, stream, start, n, out_u, out_n):
    for i in prange(n):
        out_u[i] = uniform(seed, stream, start + i)
        out_n[i] = normal(seed, stream, start + i)


def draw(seed, stream, start, n):
    u, z = np.empty(n), np.empty(n)
    _draw(seed, stream, start, n, u, z)
    return u, z


def test_same_counter_same_number_in_any_order_and_thread_count(num_threads):
    u_all, z_all = draw(7, 3, 0, 1001)
    u_tail, z_tail = draw(7, 3, 500, 501)
    np.testing.assert_array_equal(u_all[500:], u_tail)
    np.testing.assert_array_equal(z_all[500:], z_tail)


def test_seeds_and_streams_give_different_numbers():
    a, _ = draw(1, 0, 0, 100)
    b, _ = draw(2, 0, 0, 100)
    c, _ = draw(1, 1, 0, 100)
    assert not np.any(a == b) and not np.any(a == c)


def test_distributions():
    u, z = draw(123, 0, 0, 200_000)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    # upper-tail frequency of a normal: P(Z > 2) = 0.02275
    assert abs(np.mean(z > 2.0) - 0.02275) < 0.002


def test_hash_is_uint64():
    assert hash_index(1, 2, 3) == hash_index(1, 2, 3)
    assert hash_index(1, 2, 3) != hash_index(1, 2, 4)
