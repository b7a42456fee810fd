"""bfloat16 optimizer states and parameters: stochastic rounding where round-to-nearest stalls."""

import numba
import numpy as np
import pytest

from npcpu.kernels import optim as kernels
from npcpu.kernels.optim_io import Rounding, random_scratch
from npcpu.kernels.convert import round_bf16_stochastic_with_bits
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16


def crafted_float32():
    """Random magnitudes over the whole range, ties, neighbours of ties, Inf, NaN, subnormals."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal(3000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 3000)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                        3.0e38, 3.4e38, 1e-40], np.float32)
    payload_nan = np.array([0x7F800001, 0xFFC12345], np.uint32).view(np.float32)
    return np.concatenate([values.astype(np.float32), special, payload_nan])


def round_momentum_buffer(grad, stochastic, seed, stream):
    """The bf16 bits an SGD first step stores: momentum_buffer = grad (lr = 0 leaves the weights)."""
    buffer = np.zeros(grad.size, np.uint16)
    weights = np.zeros(grad.size, np.float32)
    f32 = np.float32
    hyper = kernels.SGDHyper(lr=f32(0.0), momentum=f32(0.9), one_minus_dampening=f32(1.0),
                             weight_decay=f32(0.0), nesterov=False, maximize=False, first_step=True)
    rounding = Rounding(stochastic=stochastic, seed=np.uint64(seed), stream=np.uint64(stream),
                        first=np.uint64(0), random=random_scratch())
    kernels.sgd_step(weights, grad, buffer, hyper, rounding)
    return buffer


def mix64_twin(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_fields_twin(n, seed, stream, slot):
    """Element i's 16 bits: field i % 4 of hash_index(seed, stream, 4 * (i // 4) + slot)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = mix64_twin(np.uint64(seed) * golden + np.uint64(stream))
        index = 4 * (np.arange(n, dtype=np.uint64) // np.uint64(4)) + np.uint64(slot)
        hashes = mix64_twin(key ^ (index * golden))
    return (hashes >> (np.uint64(16) * (np.arange(n, dtype=np.uint64) % np.uint64(4)))) & np.uint64(0xFFFF)


def test_bf16_state_rounds_to_nearest_exactly_as_ml_dtypes(num_threads):
    values = crafted_float32()
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on NaN; it maps it to sign | 0x7fc0
        expected = values.astype(bfloat16).view(np.uint16)
    np.testing.assert_array_equal(round_momentum_buffer(values, False, 0, 0), expected)


def test_bf16_state_rounds_stochastically_with_the_documented_bits(num_threads):
    values = crafted_float32()
    seed, stream = 12345, (7 << 32) | 3
    random16 = random_fields_twin(values.size, seed, stream, kernels.EXP_AVG_SLOT)
    bits = values.view(np.uint32).astype(np.uint64)
    expected = ((bits + random16) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(values)
    with np.errstate(invalid="ignore"):
        expected[nan] = values[nan].astype(bfloat16).view(np.uint16)  # NaN: sign | 0x7fc0
    np.testing.assert_array_equal(round_momentum_buffer(values, True, seed, stream), expected)


def test_stochastic_rounding_is_unbiased_over_all_random_values():
    """Over the 2^16 possible random fields, x rounds up exactly (dropped bits) times."""
    for x in np.array([1.0 + 2.0 ** -10, -3.14159, 1e-3, 7.0e4], np.float32):
        low = int(x.view(np.uint32) & 0xFFFF)
        down = int(x.view(np.uint32) >> 16)
        ups = sum(int(round_bf16_stochastic_with_bits(x, r)) != down for r in range(65536))
        assert ups == low


def sgd_drift(stochastic):
    """bf16 weights at 1.0 moved by 1e-4 per step (1/78 of an ulp) for 1000 steps: should reach 0.9."""
    p = Parameter(np.ones(512, dtype=bfloat16))
    optimizer = SGD([p], lr=0.1, stochastic_rounding=stochastic, seed=1)
    for _ in range(1000):
        p.grad = np.full(512, 1e-3, np.float32)
        optimizer.step()
    return p.values()


def adam_second_moment(state_dtype, stochastic):
    """v = 0.1 after one large gradient, then 1500 small ones: v must decay by beta2 = 0.999 per step."""
    p = Parameter(np.zeros(512, np.float32))
    optimizer = Adam([p], lr=1e-6, state_dtype=state_dtype, stochastic_rounding=stochastic, seed=2)
    p.grad = np.full(512, 10.0, np.float32)
    optimizer.step()
    for _ in range(1500):
        p.grad = np.full(512, 0.01, np.float32)
        optimizer.step()
    return optimizer.state[0]["exp_avg_sq"].astype(np.float32)


def test_stochastic_rounding_moves_a_bf16_weight_by_sub_ulp_updates_where_rne_cannot():
    rne, sr = sgd_drift(False), sgd_drift(True)
    np.testing.assert_array_equal(rne, 1.0)  # round-to-nearest loses every update
    assert abs(sr.mean() - 0.9) < 0.005     # stochastic rounding keeps them on average
    assert sr.std() < 0.03  # a random walk: sqrt(1000 * p (1 - p)) ulps, about 0.02


def test_stochastic_rounding_lets_a_bf16_second_moment_decay_where_rne_stalls():
    exact = adam_second_moment("fp32", False)
    rne, sr = adam_second_moment("bf16", False), adam_second_moment("bf16", True)
    assert exact.mean() < 0.03
    assert rne.mean() > 2 * exact.mean()                       # round-to-nearest: stuck high
    assert abs(sr.mean() / exact.mean() - 1) < 0.05          # stochastic: follows fp32 on average


def test_stochastic_rounding_does_not_depend_on_thread_count(num_threads):
    rng = np.random.default_rng(4)
    start = rng.standard_normal(10_007).astype(bfloat16)
    results = []
    for threads in (1, num_threads):
        numba.set_num_threads(threads)
        p = Parameter(start.copy())
        optimizer = Adam([p], lr=1e-3, state_dtype="bf16", seed=9)
        for t in range(5):
            p.grad = np.sin(p.values() + t)
            optimizer.step()
        results.append((p.data.view(np.uint16).copy(), optimizer.state[0]["exp_avg_sq"].view(np.uint16).copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [bfloat16, np.float16])
def test_master_weights_follow_the_float32_run(dtype):
    start = np.linspace(-1, 1, 33, dtype=np.float32).astype(dtype).astype(np.float32)
    reference = Parameter(start.copy())
    half = Parameter(start.astype(dtype))
    optimizers = [Adam([reference], lr=1e-4), Adam([half], lr=1e-4, master_weights=True)]
    for t in range(30):
        for p, optimizer in zip((reference, half), optimizers):
            p.grad = np.cos(np.float32(t) + np.arange(33, dtype=np.float32))
            optimizer.step()
    master = optimizers[1].state[0]["master_param"]
    np.testing.assert_array_equal(master, reference.data)
    np.testing.assert_array_equal(half.data, master.astype(dtype))


def test_float16_parameters_always_get_a_master_copy():
    p = Parameter(np.ones(8, np.float16))
    optimizer = SGD([p], lr=1e-4)
    for _ in range(10):
        p.grad = np.ones(8, np.float32)  # each update is 1/10 of a float16 ulp at 1.0
        optimizer.step()
    np.testing.assert_allclose(optimizer.state[0]["master_param"], 1 - 1e-3, rtol=1e-6)
    assert p.data.dtype == np.float16
