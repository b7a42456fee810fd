"""npcpu.train.compiled and npcpu.kernels.compiled_step: NumPy twins of the kernels, and whole
epochs against the reference loop (model.forward, loss, backward, SGD.step, zero_grad)."""

import numpy as np
import pytest

from npcpu.data.arrays import ArrayDataset
from npcpu.data.loader import DataLoader
from npcpu.kernels import compiled_gemm
from npcpu.kernels import compiled_step as kernels
from npcpu.kernels import compiled_update
from npcpu.kernels.linear import add_row_sums
from npcpu.kernels.optim import SGDHyper
from npcpu.nn.activations import GELU, ReLU, Tanh
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss, MSELoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.clip import get_total_norm
from npcpu.optim.lamb import LAMB
from npcpu.optim.sgd import SGD
from npcpu.train.compiled import CompiledClassifierStep

RTOL, ATOL = 1e-5, 1e-6  # float32: the GEMMs sum in another order than BLAS


# ---------------------------------------------------------------------------------------------
# kernels against plain NumPy
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, k, m", [(13, 37, 7), (4, 5, 2), (1, 3, 1), (9, 64, 10)])
@pytest.mark.parametrize("relu, has_bias", [(False, True), (True, True), (True, False)])
def test_linear_forward_matches_numpy(dtype, n, k, m, relu, has_bias):
    rng = np.random.default_rng(n * 100 + k)
    a = rng.standard_normal((n + 5, k)).astype(dtype)
    rows = rng.permutation(n + 5)[:n]
    weight = rng.standard_normal((m, k)).astype(dtype)
    bias = rng.standard_normal(m).astype(dtype) if has_bias else np.empty(0, dtype)
    out = np.full((n + 2, m), np.nan, dtype)
    compiled_gemm.linear_forward(a, rows, weight, bias, relu, out, 0, k)
    expected = a[rows] @ weight.T + (bias if has_bias else 0)
    if relu:
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(out[:n], expected, rtol=RTOL, atol=ATOL * k)


@pytest.mark.parametrize("n, k, m", [(13, 37, 7), (4, 5, 2), (1, 3, 1), (8, 9, 10)])
def test_backward_kernels_match_numpy(n, k, m):
    rng = np.random.default_rng(n + k + m)
    a = rng.standard_normal((n + 3, k)).astype(np.float32)
    rows = rng.permutation(n + 3)[:n]
    weight = rng.standard_normal((m, k)).astype(np.float32)
    dz = rng.standard_normal((n + 2, m)).astype(np.float32)
    grad_weight = rng.standard_normal((m, k)).astype(np.float32)  # the kernels add to it
    expected = grad_weight + dz[:n].T @ a[rows]
    compiled_gemm.add_weight_grad(dz, a, rows, grad_weight, 0, k)
    np.testing.assert_allclose(grad_weight, expected, rtol=RTOL, atol=ATOL * n)
    grad_bias = rng.standard_normal(m).astype(np.float32)
    expected = grad_bias + dz[:n].sum(axis=0)
    add_row_sums(dz[:n], grad_bias)
    np.testing.assert_allclose(grad_bias, expected, rtol=RTOL, atol=ATOL * n)
    dx = np.full((n + 2, k), np.nan, np.float32)
    compiled_gemm.input_grad(dz, weight, n, dx)
    np.testing.assert_allclose(dx[:n], dz[:n] @ weight, rtol=RTOL, atol=ATOL * m)
    out = np.maximum(rng.standard_normal((n + 2, m)), 0).astype(np.float32)
    masked = dz.copy()
    compiled_gemm.relu_backward(masked, out, n)
    np.testing.assert_array_equal(masked[:n], np.where(out[:n] > 0, dz[:n], 0))
    np.testing.assert_array_equal(masked[n:], dz[n:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_in_place_matches_numpy_on_a_strided_slice(dtype):
    """g_W0's scaling by x_scale, one row of a column block at a time: a * scale rounded once,
    as NumPy's product; the columns outside the slice are left alone."""
    rng = np.random.default_rng(4)
    grad = rng.standard_normal((3, 37)).astype(dtype)
    expected = grad.copy()
    expected[1, 5:28] = grad[1, 5:28] * dtype(1 / 255)
    kernels.scale_in_place(grad[1, 5:28], dtype(1 / 255))
    np.testing.assert_array_equal(grad, expected)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = (5 * rng.standard_normal((11, 7))).astype(np.float32)
    y = rng.integers(0, 7, 20)
    rows = rng.permutation(20)[:9]
    dlogits = np.full_like(logits, np.nan)
    targets, losses = np.full(11, -5, np.int64), np.full(11, np.nan)  # workspaces, overwritten
    loss = kernels.cross_entropy_rows(logits, y, rows, 1 / 16, dlogits, targets, losses)
    z = logits[:9].astype(np.float64)
    log_softmax = z - z.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-log_softmax[np.arange(9), y[rows]].sum(), rel=1e-6)
    expected = np.exp(log_softmax)
    expected[np.arange(9), y[rows]] -= 1
    np.testing.assert_allclose(dlogits[:9], expected / 16, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov, maximize, first", [
    (0.0, 0.0, 0.0, False, False, True), (0.9, 0.0, 1e-2, True, False, False),
    (0.9, 0.3, 0.0, False, True, False), (0.5, 0.0, 0.1, False, False, True)])
def test_sgd_update_matches_formula(momentum, dampening, weight_decay, nesterov, maximize, first):
    rng = np.random.default_rng(2)
    w, g, b = (rng.standard_normal(23) for _ in range(3))
    param, buffer = w.copy(), (b.copy() if momentum else np.empty(0))
    compiled_update.sgd_update(param, g, buffer, SGDHyper(lr=0.1, momentum=momentum,
                                                          one_minus_dampening=1 - dampening,
                                                          weight_decay=weight_decay,
                                                          nesterov=nesterov, maximize=maximize,
                                                          first_step=first))
    d = (-g if maximize else g) + weight_decay * w
    if momentum:
        new_b = d if first else momentum * b + (1 - dampening) * d
        np.testing.assert_allclose(buffer, new_b, rtol=1e-12)
        d = d + momentum * new_b if nesterov else new_b
    np.testing.assert_allclose(param, w - 0.1 * d, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("code, layer", [
    (compiled_gemm.GELU, lambda: GELU()), (compiled_gemm.GELU_TANH, lambda: GELU("tanh")),
    (compiled_gemm.TANH, lambda: Tanh()), (compiled_gemm.RELU, lambda: ReLU())])
def test_activations_match_the_reference_layers(dtype, code, layer):
    """activation_forward / activation_backward on the first n rows against npcpu.nn's layer,
    with a random upstream gradient."""
    rng = np.random.default_rng(code)
    n, m = 7, 13
    z = (3 * rng.standard_normal((n + 2, m))).astype(dtype)
    dy = rng.standard_normal((n + 2, m)).astype(dtype)
    module = layer()
    module.input_requires_grad = True
    if dtype == np.float64:
        module.set_precision("fp64")
    expected_y = module.forward(z[:n])
    expected_dx = module.backward(dy[:n])
    out = z.copy()
    if code == compiled_gemm.RELU:  # applied by the GEMM as it writes its sums
        out[:n] = np.maximum(out[:n], 0)
    kept = np.full_like(z, np.nan)
    compiled_gemm.activation_forward(code, out, kept, n)
    np.testing.assert_array_equal(out[:n], expected_y)
    np.testing.assert_array_equal(out[n:], z[n:])
    dz = dy.copy()
    compiled_gemm.activation_backward(code, dz, out, kept, n)
    np.testing.assert_array_equal(dz[:n], expected_dx)
    np.testing.assert_array_equal(dz[n:], dy[n:])


@pytest.mark.parametrize("decoupled, weight_decay, maximize", [
    (False, 0.0, False), (False, 0.1, True), (True, 0.1, False)])
def test_adam_update_matches_the_reference_optimizer(decoupled, weight_decay, maximize):
    """compiled_update's Adam / AdamW step, bit for bit the reference optimizer's, over 3 steps."""
    rng = np.random.default_rng(6)
    model = Sequential(Linear(7, 3, seed=0))
    kind = AdamW if decoupled else Adam
    reference = kind(model.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                     weight_decay=weight_decay, maximize=maximize)
    weight = model[0].weight
    param = weight.data.copy().reshape(-1)
    exp_avg, exp_avg_sq = np.zeros_like(param), np.zeros_like(param)
    thread_model = kernels.ThreadModel(
        weights=(), biases=(), activations=np.zeros(0, np.int64), adam=True,
        first_moments=(exp_avg,), second_moments=(exp_avg_sq,),
        hyper=np.array([[0.8, 0.99, 1e-6, weight_decay]]), flags=np.array([[decoupled, maximize]]),
        storage=np.array([compiled_update.KEEP]), masters=(np.empty(0, np.float32),),
        tensor_index=np.zeros(1, np.int64), seed=np.uint64(0), bf16_inputs=False,
        grad_weights=(), grad_biases=())
    for t in (1, 2, 3):
        grad = rng.standard_normal(weight.shape).astype(np.float32)
        weight.grad, model[0].bias.grad = grad.copy(), np.zeros(3, np.float32)
        reference.step()
        corrections = np.array([1 - 0.8 ** t, (1 - 0.99 ** t) ** 0.5])
        for first, stop in ((0, 4), (4, 7)):  # in two runs of columns, as W_0's column blocks
            compiled_update.update_parameter(thread_model, 0, param.reshape(3, 7), grad, first,
                                             stop, 0.01, corrections, t)
        np.testing.assert_array_equal(param, weight.data.reshape(-1))
        state = reference.state[reference.index_of(weight)]
        np.testing.assert_array_equal(exp_avg, state["exp_avg"].reshape(-1))
        np.testing.assert_array_equal(exp_avg_sq, state["exp_avg_sq"].reshape(-1))


# ---------------------------------------------------------------------------------------------
# whole epochs against the reference loop
# ---------------------------------------------------------------------------------------------
def _problem(layers, optimizer_settings, precision="fp32", seed=0):
    """(model, loss, optimizer); optimizer_settings: SGD's keyword arguments, or (class, them)."""
    model = Sequential(*layers)
    model.input_requires_grad = False
    if precision != "fp32":
        model.set_precision(precision)
    kind, settings = optimizer_settings if isinstance(optimizer_settings, tuple) \
        else (SGD, optimizer_settings)
    return model, CrossEntropyLoss(), kind(model.parameters(), **settings)


def _reference_epoch(model, loss_fn, optimizer, loader, epoch):
    losses = []
    for x, y in loader.iter_from(epoch, 0):
        logits = model.forward(x)
        losses.append(loss_fn(logits, y))
        model.backward(loss_fn.backward())
        optimizer.step()
        optimizer.zero_grad()
    return np.array(losses)


MODELS = {
    "logreg": lambda: [Linear(23, 5, seed=0)],
    "mlp": lambda: [FusedLinearReLU(23, 17, seed=0), FusedLinearReLU(17, 9, bias=False, seed=1),
                    Linear(9, 5, seed=2)],
    "gelu_tanh": lambda: [Linear(23, 17, seed=0), GELU(), Linear(17, 9, bias=False, seed=1),
                          Tanh(), Linear(9, 5, seed=2)],
    "gelu_tanh_form_relu": lambda: [Linear(23, 11, seed=0), GELU("tanh"), Linear(11, 7, seed=1),
                                    ReLU(), Linear(7, 5, seed=2)],
}
OPTIMIZERS = {
    "plain": dict(lr=0.1),
    "momentum_decay": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True),
    "dampening_maximize": dict(lr=0.01, momentum=0.5, dampening=0.2, maximize=True),
    "adam_decay": (Adam, dict(lr=0.01, weight_decay=1e-2)),
    "adamw_maximize": (AdamW, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, maximize=True)),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_epochs_match_reference_loop(model_name, optimizer_name, drop_last, num_threads):
    rng = np.random.default_rng(3)
    dataset = ArrayDataset(rng.standard_normal((203, 23)).astype(np.float32), rng.integers(0, 5, 203))
    loader = DataLoader(dataset, 16, seed=7, drop_last=drop_last, prefetch=0)
    reference = _problem(MODELS[model_name](), OPTIMIZERS[optimizer_name])
    compiled = _problem(MODELS[model_name](), OPTIMIZERS[optimizer_name])
    step = CompiledClassifierStep(*compiled)
    for epoch in (0, 1):  # the second epoch starts from momentum buffers and step counts
        expected = _reference_epoch(*reference, loader, epoch)
        losses = step.train_epoch(loader, epoch)
        assert losses.shape == (len(loader),)
        np.testing.assert_allclose(losses, expected, rtol=RTOL, atol=ATOL)
    for (name, want), (_, got) in zip(reference[0].state_dict().items(),
                                      compiled[0].state_dict().items()):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    _assert_same_optimizer_state(compiled[2], reference[2], 2 * len(loader))


def _assert_same_optimizer_state(got, want, steps, rtol=RTOL, atol=ATOL):
    assert got.state.keys() == want.state.keys()
    for index, state in want.state.items():
        assert got.state[index].keys() == state.keys()
        assert got.state[index]["step"] == state["step"] == steps
        for name in state.keys() - {"step"}:
            assert got.state[index][name].dtype == state[name].dtype
            np.testing.assert_allclose(got.state[index][name], state[name], rtol=rtol, atol=atol,
                                       err_msg=f"{index} {name}")


@pytest.mark.parametrize("model_name", MODELS)
def test_uint8_pixels_with_a_scale_match_the_reference_loop(model_name, num_threads):
    """The compiled step reads the uint8 pixels and scales the GEMMs' sums; the reference loop
    gets the data set's float32 batches (pixels times the scale)."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (203, 23), dtype=np.uint8)
    dataset = ArrayDataset(pixels, rng.integers(0, 5, 203), scale=1 / 255)
    loader = DataLoader(dataset, 16, seed=7, prefetch=0)
    reference = _problem(MODELS[model_name](), OPTIMIZERS["momentum_decay"])
    compiled = _problem(MODELS[model_name](), OPTIMIZERS["momentum_decay"])
    step = CompiledClassifierStep(*compiled)
    for epoch in (0, 1):
        np.testing.assert_allclose(step.train_epoch(loader, epoch),
                                   _reference_epoch(*reference, loader, epoch), rtol=RTOL, atol=ATOL)
    for (name, want), (_, got) in zip(reference[0].state_dict().items(),
                                      compiled[0].state_dict().items()):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    with pytest.raises(TypeError, match="x must be a float32 array, got uint8 .uint8 pixels need"):
        step.train_steps(pixels, dataset.y, np.arange(203), 16)
    with pytest.raises(TypeError, match="x must be a uint8 array, got float32"):
        step.train_steps(pixels.astype(np.float32), dataset.y, np.arange(203), 16, x_scale=0.5)


@pytest.mark.parametrize("model_name, settings", [
    ("mlp", dict(lr=0.1, momentum=0.9)), ("gelu_tanh", (AdamW, dict(lr=0.01))),
    ("gelu_tanh_form_relu", (Adam, dict(lr=0.01, weight_decay=0.1)))])
def test_reference_path_continues_a_compiled_run_in_float64(model_name, settings):
    rng = np.random.default_rng(4)
    dataset = ArrayDataset(rng.standard_normal((60, 23)), rng.integers(0, 5, 60))
    x, y = dataset.x.astype(np.float64), dataset.y  # the data set keeps float32 features
    loader = DataLoader(dataset, 8, seed=1, prefetch=0)
    reference = _problem(MODELS[model_name](), settings, precision="fp64")
    mixed = _problem(MODELS[model_name](), settings, precision="fp64")
    expected = np.concatenate([_reference_epoch(*reference, loader, e) for e in (0, 1)])
    order = loader.order(0)
    step = CompiledClassifierStep(*mixed)
    first = step.train_steps(x, y, order, 8, steps=3)  # 3 steps compiled, the rest of the epoch
    rest = step.train_steps(x, y, order, 8, first_batch=3)  # too, then epoch 1 by the reference
    got = np.concatenate([first, rest, _reference_epoch(*mixed, loader, 1)])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    for (name, want), (_, have) in zip(reference[0].state_dict().items(),
                                       mixed[0].state_dict().items()):
        np.testing.assert_allclose(have, want, rtol=1e-12, atol=1e-15, err_msg=name)
    _assert_same_optimizer_state(mixed[2], reference[2], 2 * len(loader), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# what is refused
# ---------------------------------------------------------------------------------------------
def _logreg():
    return _problem([Linear(6, 3, seed=0)], dict(lr=0.1))


def test_refuses_unsupported_models_losses_and_optimizers():
    model, loss_fn, optimizer = _logreg()
    with pytest.raises(TypeError, match="layer 1 is a ReLU not right after a Linear; supported"):
        relu_model = Sequential(FusedLinearReLU(6, 3), ReLU())
        CompiledClassifierStep(relu_model, loss_fn, SGD(relu_model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="layer 2 is a Tanh not right after a Linear"):
        tanh_model = Sequential(Linear(6, 3), GELU(), Tanh())
        CompiledClassifierStep(tanh_model, loss_fn, SGD(tanh_model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="loss_fn is a MSELoss"):
        CompiledClassifierStep(model, MSELoss(), optimizer)
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        CompiledClassifierStep(model, CrossEntropyLoss(label_smoothing=0.1), optimizer)
    with pytest.raises(ValueError, match="ignore_index=2 is one of the 3 classes"):
        CompiledClassifierStep(model, CrossEntropyLoss(ignore_index=2), optimizer)
    with pytest.raises(TypeError, match="optimizer is a LAMB"):
        CompiledClassifierStep(model, loss_fn, LAMB(model.parameters()))
    with pytest.raises(ValueError, match="AdamW has amsgrad=True"):
        CompiledClassifierStep(model, loss_fn, AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="Adam has state_dtype='bf16'"):
        CompiledClassifierStep(model, loss_fn, Adam(model.parameters(), state_dtype="bf16"))
    with pytest.raises(ValueError, match="state_dtype='bf16'"):
        CompiledClassifierStep(model, loss_fn, SGD(model.parameters(), lr=0.1, state_dtype="bf16"))
    with pytest.raises(ValueError, match="not exactly the model's"):
        CompiledClassifierStep(model, loss_fn, SGD([model[0].weight], lr=0.1))
    model[0].bias.frozen = True
    with pytest.raises(ValueError, match="'0.bias' is frozen"):
        CompiledClassifierStep(model, loss_fn, optimizer)
    fp16_model, _, _ = _problem([Linear(6, 3)], dict(lr=0.1), precision="fp16")
    with pytest.raises(ValueError, match="is float16 .all must be float32, all float64 or all "
                                         "bfloat16"):
        CompiledClassifierStep(fp16_model, loss_fn, SGD(fp16_model.parameters(), lr=0.1))


def test_refuses_bad_data():
    step = CompiledClassifierStep(*_logreg())
    x, y, order = np.zeros((5, 6), np.float32), np.zeros(5, np.int64), np.arange(5)
    with pytest.raises(TypeError, match="x must be a float32 array, got float64"):
        step.train_steps(x.astype(np.float64), y, order, 2)
    with pytest.raises(ValueError, match=r"x must be \(samples, 6\), got \(5, 4\)"):
        step.train_steps(x[:, :4], y, order, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        step.train_steps(x, y + 3, order, 2)
    with pytest.raises(ValueError, match=r"order must be 1-D integer indices in \[0, 5\)"):
        step.train_steps(x, y, order + 1, 2)
    with pytest.raises(ValueError, match="4 steps from batch 0 do not fit"):
        step.train_steps(x, y, order, 2, steps=4)


# ---------------------------------------------------------------------------------------------
# threads, per-step learning rates, gradient norms, a diverged step
# ---------------------------------------------------------------------------------------------
def _mlp_data(rows=150, seed=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 23)).astype(np.float32), rng.integers(0, 5, rows)


@pytest.mark.parametrize("model_name, optimizer_name", [
    ("mlp", "momentum_decay"), ("gelu_tanh", "adam_decay"),
    ("gelu_tanh_form_relu", "adamw_maximize")])
def test_results_do_not_depend_on_the_thread_count(model_name, optimizer_name):
    x, y = _mlp_data()
    order = np.random.default_rng(0).permutation(len(x))
    results = []
    for threads in [t for t in (1, 2, 4) if kernels.COLUMN_BLOCKS % t == 0]:
        model, loss_fn, optimizer = _problem(MODELS[model_name](), OPTIMIZERS[optimizer_name])
        losses = CompiledClassifierStep(model, loss_fn, optimizer).train_steps(
            x, y, order, 32, threads=threads)
        results.append((losses, [p.data.copy() for p in model.parameters()]))
    for losses, params in results[1:]:
        np.testing.assert_array_equal(losses, results[0][0])
        for got, want in zip(params, results[0][1]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("late_limit, alone_from", [((1e9, 0.0), 5), ((-1.0, 0.0), 0),
                                                   ((10.0, -3.0), 2)])
def test_going_on_alone_mid_call_changes_no_result(late_limit, alone_from):
    """Two threads that leave the steps to thread 0 at the first meeting of step `alone_from`
    (late_limit (allowed, share): more late meetings than allowed + share * 2 s at step s; here
    passed at step 2 whatever the real ones: at most 4 s by then, and 10 - 6 s < 0 first at s = 2)
    give the same losses, gradient norms and parameters bit for bit as two threads throughout;
    5 steps of 32 rows (the last one 22)."""
    x, y = _mlp_data()
    order = np.random.default_rng(0).permutation(len(x))
    results = []
    for limit in [(1e9, 0.0), late_limit]:
        model, loss_fn, optimizer = _problem(MODELS["gelu_tanh"](), OPTIMIZERS["adam_decay"])
        step = CompiledClassifierStep(model, loss_fn, optimizer)
        step.late_limit = limit
        grad_norms = np.empty(5)
        losses = step.train_steps(x, y, order, 32, threads=2, grad_norms=grad_norms)
        results.append((losses, grad_norms, [p.data.copy() for p in model.parameters()]))
    assert step.alone_from == alone_from
    (losses, grad_norms, params), (want_losses, want_norms, want_params) = results[1], results[0]
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(grad_norms, want_norms)
    for got, want in zip(params, want_params):
        np.testing.assert_array_equal(got, want)


def test_per_step_learning_rates_and_gradient_norms_match_the_reference_loop():
    x, y = _mlp_data()
    loader = DataLoader(ArrayDataset(x, y), 16, seed=2, prefetch=0)
    lrs = np.linspace(0.2, 0.01, len(loader))[:, None]
    reference = _problem(MODELS["mlp"](), OPTIMIZERS["nesterov"])
    model, loss_fn, optimizer = reference
    expected_losses, expected_norms = [], []
    for step, (xb, yb) in enumerate(loader.iter_from(0, 0)):
        expected_losses.append(loss_fn(model.forward(xb), yb))
        model.backward(loss_fn.backward())
        expected_norms.append(get_total_norm(model.parameters()))
        optimizer.param_groups[0]["lr"] = lrs[step, 0]
        optimizer.step()
        optimizer.zero_grad()
    compiled = _problem(MODELS["mlp"](), OPTIMIZERS["nesterov"])
    norms = np.empty(len(loader))
    losses = CompiledClassifierStep(*compiled).train_steps(x, y, loader.order(0), 16, lrs=lrs,
                                                           grad_norms=norms, threads=2)
    np.testing.assert_allclose(losses, expected_losses, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(norms, expected_norms, rtol=RTOL)
    assert compiled[2].param_groups[0]["lr"] == OPTIMIZERS["nesterov"]["lr"]  # left as it was
    for (name, want), (_, got) in zip(reference[0].state_dict().items(),
                                      compiled[0].state_dict().items()):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_step_with_a_non_finite_loss_is_not_taken(threads):
    x, y = _mlp_data(64)
    order = np.arange(64)
    x[order[2 * 16 + 5], 3] = np.nan  # a sample of the third batch
    clean = _problem(MODELS["mlp"](), OPTIMIZERS["momentum_decay"])
    CompiledClassifierStep(*clean).train_steps(x, y, order, 16, steps=2, threads=threads)
    diverged = _problem(MODELS["mlp"](), OPTIMIZERS["momentum_decay"])
    losses = CompiledClassifierStep(*diverged).train_steps(x, y, order, 16, threads=threads)
    assert losses.shape == (3,) and np.all(np.isfinite(losses[:2])) and np.isnan(losses[2])
    for want, got in zip(clean[0].parameters(), diverged[0].parameters()):
        np.testing.assert_array_equal(got.data, want.data)
    assert all(state["step"] == 2 for state in diverged[2].state.values())


def test_default_threads_follow_numba_and_the_work_of_a_step(num_threads):
    big = CompiledClassifierStep(*_problem([Linear(784, 10, seed=0)], dict(lr=0.1)))
    assert big.default_threads(128) == min(num_threads, kernels.COLUMN_BLOCKS)
    tiny = CompiledClassifierStep(*_logreg())
    assert tiny.default_threads(8) == 1  # 6 -> 3 features: a barrier costs more than the work


def test_refuses_bad_threads_and_learning_rates():
    step = CompiledClassifierStep(*_logreg())
    x, y, order = np.zeros((5, 6), np.float32), np.zeros(5, np.int64), np.arange(5)
    with pytest.raises(ValueError, match=f"threads must divide {kernels.COLUMN_BLOCKS}, got 3"):
        step.train_steps(x, y, order, 2, threads=3)
    with pytest.raises(ValueError, match=r"lrs must be \(3, 1\) finite learning rates"):
        step.train_steps(x, y, order, 2, lrs=np.full((3, 1), np.nan))
    with pytest.raises(ValueError, match=r"grad_norms must be a \(3,\) float64 array"):
        step.train_steps(x, y, order, 2, grad_norms=np.empty(2))
