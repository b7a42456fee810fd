"""A bfloat16 parameter updated in place (no float32 master copy) that ends up Inf or NaN stops
the run naming it: an update rounded to Inf inside the kernel, or a non-finite gradient inside
backward (npcpu.kernels.finite; the master-copy path is tested in test_numerical_faults)."""

import io

import numba
import numpy as np
import pytest

from npcpu.data.arrays import ArrayDataset
from npcpu.kernels.finite import EXPONENT_MASKS_16, count_nonfinite_bits
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16
from npcpu.train.trainer import Trainer


def count_nonfinite_reference(bits: np.ndarray, mask: np.uint16) -> int:
    return int(np.count_nonzero((bits & mask) == mask))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [0, 1, 7, 16385, 100003])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_count_nonfinite_bits_matches_numpy(threads, n, dtype):
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 100).astype(bfloat16 if dtype == "bfloat16" else np.float16)
    for special in (np.inf, -np.inf, np.nan):
        if n:
            values[rng.integers(n, size=3)] = special
    if n:
        values[0] = 3.3895e38 if dtype == "bfloat16" else 65504.0  # the largest finite
    bits = values.view(np.uint16)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        found = count_nonfinite_bits(bits, EXPONENT_MASKS_16[dtype])
    finally:
        numba.set_num_threads(previous)
    assert found == count_nonfinite_reference(bits, EXPONENT_MASKS_16[dtype])
    assert found == int(np.count_nonzero(~np.isfinite(values.astype(np.float32))))


@pytest.mark.parametrize("make_optimizer", [
    lambda p, size: SGD([p], lr=size, stochastic_rounding=False),
    lambda p, size: SGD([p], lr=size, momentum=0.9, stochastic_rounding=False),
    lambda p, size: Adam([p], lr=size, stochastic_rounding=False),
], ids=["sgd", "sgd-momentum", "adam"])
def test_an_in_place_bf16_update_that_rounds_to_inf_is_an_error_naming_the_parameter(make_optimizer):
    # bfloat16's largest finite + 1e36 is finite in float32 and rounds to Inf in bfloat16
    p = Parameter(np.array([3.3895e38, 1.0, -2.0, 0.5, 7.0], np.float32).astype(bfloat16),
                  "fc.weight")
    optimizer = make_optimizer(p, 1e36)
    p.grad = np.array([-1.0, 0, 0, 0, 0], np.float32)
    with pytest.raises(FloatingPointError, match=r"the update of Parameter\('fc.weight'.* in place "
                                                 r"left 1 of its 5 bfloat16 values Inf or NaN"):
        optimizer.step()


def test_an_in_place_bf16_update_that_fits_is_not_an_error():
    p = Parameter(np.array([3.3e38, 1.0], np.float32).astype(bfloat16), "w")
    optimizer = SGD([p], lr=1.0, stochastic_rounding=False)
    p.grad = np.array([1e36, 0.5], np.float32)
    optimizer.step()
    assert np.isfinite(p.data.astype(np.float32)).all()


def test_a_nan_gradient_inside_backward_stops_the_run_naming_the_parameter():
    """Updates inside backward never hold the gradients for the trainer to check: the in-place
    check is what sees a NaN gradient of a bfloat16 parameter."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    data = ArrayDataset(x, np.argmax(x @ rng.standard_normal((12, 5)), axis=1))
    model = Sequential(FusedLinearReLU(12, 16, seed=0), Linear(16, 5, seed=2))
    model.set_precision("bf16")
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1),
                      precision="bf16", update_in_backward=True, log_stream=io.StringIO())
    original = model[1].backward

    def poisoned(dy):
        dy = dy.copy()
        dy[0, 0] = np.nan  # reaches layer 1's weight and bias gradients
        return original(dy)

    model[1].backward = poisoned
    with pytest.raises(FloatingPointError, match=r"SGD: the update of Parameter\('(weight|bias)'.* "
                                                 r"Inf or NaN"):
        trainer.fit(data, max_steps=1, batch_size=64, progress=False)
