"""The serial optimizer kernels (small tensors) store exactly what the parallel ones store, and the
optimizers pick them by size alone."""

import subprocess
import sys

import numpy as np
import pytest

from npcpu.kernels import launch
from npcpu.kernels import optim as kernels
from npcpu.kernels.optim_io import Rounding, random_scratch
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import AdamW
from npcpu.optim.sgd import SGD
from npcpu.precision import bfloat16

f32 = np.float32


def bf16_bits(rng, n):
    return rng.standard_normal(n).astype(np.float32).astype(bfloat16).view(np.uint16)


def rounding(first=0):
    return Rounding(stochastic=True, seed=np.uint64(3), stream=np.uint64((2 << 32) | 1),
                    first=np.uint64(first), random=random_scratch())


@pytest.mark.parametrize("n", [1, 5, 1023, 3 * 1024 + 7])
def test_serial_sgd_kernel_stores_the_parallel_kernels_bits(num_threads, n):
    rng = np.random.default_rng(n)
    grad = rng.standard_normal(n).astype(np.float32)
    hyper = kernels.SGDHyper(lr=f32(0.1), momentum=f32(0.9), one_minus_dampening=f32(0.8),
                             weight_decay=f32(0.01), nesterov=False, maximize=False, first_step=False)
    start = bf16_bits(rng, n), bf16_bits(rng, n)  # bf16 weights and momentum buffer
    results = []
    for step in (kernels.sgd_step, kernels.sgd_step_serial):
        weights, buffer = (a.copy() for a in start)
        step(weights, grad, buffer, hyper, rounding(first=8))
        results.append((weights, buffer))
    for parallel, serial in zip(*results):
        np.testing.assert_array_equal(serial, parallel)
    assert not np.array_equal(results[0][0], start[0])  # the step did move the weights


@pytest.mark.parametrize("n", [1, 7, 2 * 1024 + 3])
def test_serial_adam_kernel_stores_the_parallel_kernels_bits(num_threads, n):
    rng = np.random.default_rng(n)
    grad = rng.standard_normal(n).astype(np.float32)
    hyper = kernels.AdamHyper(one_minus_beta1=f32(0.1), beta2=f32(0.999), one_minus_beta2=f32(0.001),
                              eps=f32(1e-8), weight_decay=f32(0.0), decay_factor=f32(0.999),
                              step_size=f32(0.01), bias_correction2_sqrt=f32(0.05), maximize=True)
    start = (bf16_bits(rng, n), bf16_bits(rng, n), np.abs(bf16_bits(rng, n).view(bfloat16)).view(np.uint16),
             np.zeros(n, np.uint16))
    results = []
    for step in (kernels.adam_step, kernels.adam_step_serial):
        arrays = [a.copy() for a in start]
        step(arrays[0], grad, *arrays[1:], hyper, rounding())  # AMSGrad's maximum included
        results.append(arrays)
    for parallel, serial in zip(*results):
        np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("step", [kernels.sgd_step, kernels.sgd_step_serial])
def test_update_kernels_take_plain_tuples_as_named_ones(num_threads, step):
    """The optimizers pass the settings and Rounding as plain tuples (faster to dispatch): the
    kernels store the same bits as from the named tuples."""
    rng = np.random.default_rng(7)
    grad = rng.standard_normal(3 * 1024 + 5).astype(np.float32)
    hyper = kernels.SGDHyper(lr=f32(0.1), momentum=f32(0.9), one_minus_dampening=f32(0.8),
                             weight_decay=f32(0.01), nesterov=True, maximize=True, first_step=False)
    start = bf16_bits(rng, grad.size), bf16_bits(rng, grad.size)
    results = []
    for as_passed in (lambda t: t, tuple):
        weights, buffer = (a.copy() for a in start)
        step(weights, grad, buffer, as_passed(hyper), as_passed(rounding(first=4)))
        results.append((weights, buffer))
    for named, plain in zip(*results):
        np.testing.assert_array_equal(plain, named)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, state_dtype="bf16"),
                                  lambda ps: AdamW(ps, lr=1e-2, amsgrad=True, state_dtype="bf16")])
def test_optimizers_choose_the_serial_kernel_by_size_alone(monkeypatch, num_threads, make):
    """A run with every tensor on the serial kernels equals one with every tensor on the parallel
    ones, bit for bit; a tensor of exactly PARALLEL_ELEMENTS goes parallel."""
    assert kernels.for_size("parallel", "serial", kernels.PARALLEL_ELEMENTS) == "parallel"
    assert kernels.for_size("parallel", "serial", kernels.PARALLEL_ELEMENTS - 1) == "serial"
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(shape).astype(bfloat16) for shape in [(37, 29), (5,), (3000,)]]
    results = []
    for threshold in (0, 1 << 40):  # all parallel, then all serial
        monkeypatch.setattr(launch, "PARALLEL_ELEMENTS", threshold)
        params = [Parameter(a.copy()) for a in start]
        optimizer = make(params)
        for t in range(3):
            for p in params:
                p.grad = np.cos(p.values() * (t + 1))
            optimizer.step()
        results.append([p.data.view(np.uint16).copy() for p in params])
    for parallel, serial in zip(*results):
        np.testing.assert_array_equal(serial, parallel)


FIRST_STEP_OF_A_PROCESS = """
import numpy as np
from npcpu.nn.parameter import Parameter
from npcpu.optim.adam import Adam
from npcpu.optim.sgd import SGD
for make in (lambda ps: SGD(ps, lr=0.1), lambda ps: Adam(ps, lr=0.1)):
    p = Parameter(np.ones(10, np.float32))
    p.grad = np.ones(10, np.float32)
    make([p]).step()
    assert p.data[0] < 1, p.data
print("stepped")
"""


def test_a_serial_kernel_may_be_the_first_kernel_of_a_process():
    """Twice in fresh processes (the second loads the kernels from Numba's cache): a small step runs
    before any parallel kernel has started Numba's threads."""
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", FIRST_STEP_OF_A_PROCESS], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0 and "stepped" in result.stdout, result.stderr[-2000:]
