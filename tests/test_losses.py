import numpy as np
import pytest

from npcpu.kernels.softmax import (cross_entropy_forward_backward,
                                   cross_entropy_forward_backward_serial, target_bounds)
from npcpu.nn.losses import CrossEntropyLoss, MSELoss
from npcpu.precision import bfloat16
from tests.gradcheck import numerical_gradient


# -- the kernel against its plain-NumPy statement ------------------------------------------------

def cross_entropy_numpy(logits, targets, ignore_index, label_smoothing, grad_scale):
    """loss_row = sum_c q_c * (lse - x_c), grad = (softmax - q) * grad_scale; zero where ignored."""
    x = logits.astype(np.float64)
    rows, classes = x.shape
    lse = x.max(axis=1) + np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1))
    keep = targets != ignore_index
    q = np.full((rows, classes), label_smoothing / classes)
    q[np.flatnonzero(keep), targets[keep]] += 1.0 - label_smoothing
    losses = np.where(keep, (q * (lse[:, None] - x)).sum(axis=1), 0.0)
    grad = np.where(keep[:, None], (np.exp(x - lse[:, None]) - q) * grad_scale, 0.0)
    return losses, grad


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("rows, classes", [(1, 2), (7, 13), (67, 1001)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_kernel_matches_numpy(num_threads, rows, classes, dtype, rtol, label_smoothing):
    rng = np.random.default_rng(rows + classes)
    logits = (rng.standard_normal((rows, classes)) * 4).astype(dtype)
    targets = rng.integers(0, classes, rows)
    targets[::3] = -100
    losses, grad = np.empty(rows), np.empty_like(logits)
    cross_entropy_forward_backward(losses, grad, logits, targets, -100, label_smoothing, 0.25,
                                   logits.shape[1])
    ref_losses, ref_grad = cross_entropy_numpy(logits, targets, -100, label_smoothing, 0.25)
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol)
    # the serial twin (small batches) writes the same bits, also in place over the logits
    serial_losses, serial_grad = np.empty(rows), np.empty_like(logits)
    cross_entropy_forward_backward_serial(serial_losses, serial_grad, logits, targets, -100,
                                          label_smoothing, 0.25, logits.shape[1])
    np.testing.assert_array_equal(serial_losses, losses)
    np.testing.assert_array_equal(serial_grad, grad)
    cross_entropy_forward_backward_serial(serial_losses, logits, logits, targets, -100,
                                          label_smoothing, 0.25, logits.shape[1])
    np.testing.assert_array_equal(serial_losses, losses)
    np.testing.assert_array_equal(logits, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_serial_kernel_matches_parallel_with_padding_ignored_rows_and_nan(dtype, in_place):
    """The serial twin (one exp over the whole batch) against the row-parallel kernel, bit for
    bit: padding columns (classes < P), ignored rows, a NaN and an -inf logit, label smoothing."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((37, 13)) * 5).astype(dtype)
    logits[3, 2], logits[4, 0] = np.nan, -np.inf
    targets = rng.integers(0, 11, 37)
    targets[::4] = 7
    results = []
    for kernel in (cross_entropy_forward_backward, cross_entropy_forward_backward_serial):
        source = logits.copy()
        losses = np.empty(37)
        grad = source if in_place else np.full_like(source, np.nan)
        kernel(losses, grad, source, targets, 7, 0.1, 0.5, 11)
        results.append((losses, grad))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    assert np.isnan(results[0][0][3]) and np.all(results[0][1][:, 11:] == 0)


@pytest.mark.parametrize("size", [1, 2, 7, 129])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_target_bounds_matches_numpy(size, dtype):
    targets = np.random.default_rng(size).integers(0, 200, size).astype(dtype)
    if dtype != np.uint8:
        targets[size // 2] = -100  # an ignored row is the smallest
    assert target_bounds(targets) == (targets.min(), targets.max())


# -- float64 gradient checks: backward() against central differences of the scalar loss --------

def check_loss_gradient(loss_fn, outputs, targets, **kwargs):
    loss_fn(outputs, targets, **kwargs)
    analytic = loss_fn.backward().copy()
    assert analytic.dtype == np.float64 and analytic.shape == outputs.shape
    numeric = numerical_gradient(lambda: loss_fn(outputs, targets, **kwargs), outputs)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4)])
def test_cross_entropy_gradient_float64(shape, reduction, label_smoothing):
    rng = np.random.default_rng(sum(shape))
    logits = rng.standard_normal(shape) * 2
    targets = rng.integers(0, shape[-1], shape[:-1])
    targets.reshape(-1)[1] = 3
    loss_fn = CrossEntropyLoss(ignore_index=3, label_smoothing=label_smoothing, reduction=reduction)
    check_loss_gradient(loss_fn, logits, targets)
    check_loss_gradient(loss_fn, logits, targets, normalizer=11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_gradient_float64(reduction):
    rng = np.random.default_rng(21)
    outputs, targets = rng.standard_normal((2, 4, 3))
    loss_fn = MSELoss(reduction=reduction)
    check_loss_gradient(loss_fn, outputs, targets)
    check_loss_gradient(loss_fn, outputs, targets, normalizer=7)


# -- parity with torch ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 5), (3, 4, 6)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing, ignore_index", [(0.0, -100), (0.1, -100), (0.25, 2)])
def test_cross_entropy_matches_torch(torch, shape, reduction, label_smoothing, ignore_index):
    """(N, T, C) logits are compared as torch's (N*T, C): torch puts C at dim 1, npcpu last."""
    rng = np.random.default_rng(22)
    classes = shape[-1]
    logits = (rng.standard_normal(shape) * 3).astype(np.float32)
    targets = rng.integers(0, classes, shape[:-1])
    targets.reshape(-1)[::4] = -100 if ignore_index == -100 else 2
    loss_fn = CrossEntropyLoss(ignore_index, label_smoothing, reduction)
    loss = loss_fn(logits, targets)
    grad = loss_fn.backward()
    logits_t = torch.from_numpy(logits.reshape(-1, classes)).requires_grad_()
    loss_t = torch.nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                       reduction=reduction)(logits_t, torch.from_numpy(targets).reshape(-1))
    loss_t.backward()
    assert isinstance(loss, float) and grad.dtype == np.float32 and grad.shape == shape
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    np.testing.assert_allclose(grad.reshape(-1, classes), logits_t.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient_like_torch(torch):
    logits = np.random.default_rng(23).standard_normal((3, 4)).astype(np.float32)
    targets = np.full(3, -100)
    loss_fn = CrossEntropyLoss(label_smoothing=0.1)
    logits_t = torch.from_numpy(logits).requires_grad_()
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(targets), label_smoothing=0.1)
    loss_t.backward()
    assert np.isnan(loss_fn(logits, targets)) and np.isnan(loss_t.item())
    np.testing.assert_array_equal(loss_fn.backward(), logits_t.grad.numpy())
    np.testing.assert_array_equal(loss_fn.backward(), 0.0)


@pytest.mark.parametrize("ignore_index, ignored_rows", [(-100, 0), (-100, 3), (4, 0), (4, 2)])
def test_cross_entropy_mean_counts_exactly_the_rows_not_ignored(ignore_index, ignored_rows):
    """Batches the target check takes its short way for (all in range) and the long way for."""
    rng = np.random.default_rng(25)
    logits = rng.standard_normal((9, 6)).astype(np.float64)
    targets = rng.choice([c for c in range(6) if c != ignore_index], 9)
    targets[:ignored_rows] = ignore_index
    losses, _ = cross_entropy_numpy(logits, targets, ignore_index, 0.0, 1.0)
    loss_fn = CrossEntropyLoss(ignore_index=ignore_index)
    np.testing.assert_allclose(loss_fn(logits, targets), losses.sum() / (9 - ignored_rows),
                               rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_matches_torch(torch, reduction):
    rng = np.random.default_rng(24)
    outputs, targets = rng.standard_normal((2, 7, 3)).astype(np.float32)
    loss_fn = MSELoss(reduction)
    loss = loss_fn(outputs, targets)
    outputs_t = torch.from_numpy(outputs).requires_grad_()
    loss_t = torch.nn.MSELoss(reduction=reduction)(outputs_t, torch.from_numpy(targets))
    loss_t.backward()
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    np.testing.assert_allclose(loss_fn.backward(), outputs_t.grad.numpy(), rtol=1e-5, atol=1e-6)


# -- the accumulation window (normalizer) ---------------------------------------------------------

@pytest.mark.parametrize("loss_fn", [CrossEntropyLoss(label_smoothing=0.1), MSELoss()],
                         ids=["cross_entropy", "mse"])
def test_normalizer_makes_micro_batches_add_up_to_the_window_mean(loss_fn):
    rng = np.random.default_rng(25)
    outputs = rng.standard_normal((10, 6))
    targets = rng.integers(0, 6, 10) if isinstance(loss_fn, CrossEntropyLoss) \
        else rng.standard_normal((10, 6))
    whole = loss_fn(outputs, targets)
    whole_grad = loss_fn.backward().copy()
    parts, grads = [], []
    for part in (slice(0, 3), slice(3, 10)):
        parts.append(loss_fn(outputs[part], targets[part], normalizer=10))
        grads.append(loss_fn.backward().copy())
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(grads), whole_grad, rtol=1e-12, atol=1e-15)


# -- dtypes, non-finite values, errors ------------------------------------------------------------

def test_large_logits_stay_finite_and_nan_inf_propagate():
    loss_fn = CrossEntropyLoss()
    logits = np.array([[1e4, -1e4, 0.0], [-2e4, 1e4, 3e4]], np.float32)
    loss = loss_fn(logits, np.array([1, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(loss_fn.backward()))
    np.testing.assert_allclose(loss, (2e4 + 5e4) / 2, rtol=1e-6)
    assert np.isnan(loss_fn(np.array([[np.nan, 0.0]], np.float32), np.array([1])))
    assert np.isnan(loss_fn(np.array([[np.inf, 0.0]], np.float32), np.array([1])))
    assert loss_fn(np.array([[-np.inf, 0.0]], np.float32), np.array([0])) == np.inf
    assert np.isnan(MSELoss()(np.array([np.nan, 1.0]), np.zeros(2)))


def test_gradient_dtype_follows_the_logits():
    targets = np.array([0, 2])
    loss_fn = CrossEntropyLoss()
    loss_fn(np.zeros((2, 3), bfloat16), targets)
    assert loss_fn.backward().dtype == np.float32
    loss_fn(np.zeros((2, 3), np.float64), targets)
    assert loss_fn.backward().dtype == np.float64


def test_bad_inputs_raise_naming_what_was_expected():
    loss_fn = CrossEntropyLoss()
    logits = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match=r"target 7 .*\[0, 5\)"):
        loss_fn(logits, np.array([0, 7, 1, 2]))
    with pytest.raises(ValueError, match=r"target -1 "):
        loss_fn(logits, np.array([0, -1, 1, 2]))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3,\)"):
        loss_fn(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        loss_fn(logits, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        loss_fn(np.zeros((4, 5), np.int32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="normalizer"):
        loss_fn(logits, np.zeros(4, np.int64), normalizer=0)
    with pytest.raises(RuntimeError, match="before forward"):
        MSELoss().backward()
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 4\)"):
        MSELoss()(logits, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="reduction"):
        MSELoss("none")
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)
