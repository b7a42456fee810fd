"""A compiled fast path for small classifiers: whole epochs of SGD, Adam or AdamW in one Numba call.

The reference path (npcpu.train.trainer.Trainer, or a loop of model.forward, loss, model.backward,
optimizer.step, zero_grad) spends most of a small model's step outside the arithmetic: for
softmax regression 784 -> 10 at batch 128 a step is about 2M multiply-adds, and its Python-level
calls (shape and dtype checks, BLAS dispatch and thread-count switching, gradient zeroing, the
optimizer's per-parameter bookkeeping, the data set's index checks and gather) together cost
more than the arithmetic.
`CompiledClassifierStep` runs the same math (npcpu.kernels.compiled_step) for all the steps of an
epoch in one compiled call per thread, reading the batches straight from the (S, D) data array
in the loader's order; two threads split layer 0 by its input columns. It gives the same
parameters and per-step losses as the reference path, to float32 rounding (the GEMMs sum in
another order than BLAS), and bit-identical results on 1 or 2 threads (see the kernel
module for how).

Supported, and checked (anything else raises with a message that says what is supported):
    model      a Sequential of Linear / FusedLinearReLU layers (or one such layer), a Linear
               optionally followed by a ReLU, GELU (either form) or Tanh module; every parameter
               trainable, precision "fp32" (or "fp64", for checks), or "bf16" where the bf16
               GEMMs run natively (npcpu.backend.use_native_bf16_gemm), no Tanh after the last
               Linear, and float32 features (not uint8 with a scale)
    loss_fn    CrossEntropyLoss(reduction="mean", label_smoothing=0), ignore_index not a class
    optimizer  over exactly the model's parameters (any parameter groups), state_dtype "fp32":
               SGD (momentum, dampening, nesterov, weight_decay, maximize as torch.optim.SGD),
               Adam or AdamW (betas, eps, weight_decay, maximize as torch; amsgrad=False); bf16
               parameters with stochastic rounding, rounding to nearest or an fp32 master copy
Not supported (the reference path runs them): fp16 storage, bf16 with widened GEMMs, bf16
optimizer states, AMSGrad, other layers, losses and optimizers.

Under bf16 the step rounds where the reference's native bf16 GEMMs do (every layer's input, and
dz once its bias gradient is taken; GELU's kept input and tanh's kept output as the layers keep
them), computes in float32 (the bf16 weights widened into float32 copies for the call), and
stores each update as the reference optimizer does: the same stochastic-rounding bits (keyed by
seed, step, parameter index and element), or rounded to nearest from the fp32 master copy. The
GEMMs sum in another order than the native kernels, so results agree to float32 rounding until an
update lands on the other side of a bf16 rounding boundary (then by one bf16 unit in that weight).

The parameters are updated in place (the Parameter arrays themselves), and the optimizer's state
("step", "momentum_buffer" or "exp_avg", "exp_avg_sq") is kept as the optimizer keeps it, so the
reference path can take over at any step boundary, and the other way round. Parameter.grad is not
touched (the reference loop leaves it zeroed after each step; here the gradients live only inside
the call).

Usage::

    step = CompiledClassifierStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1))
    loader = DataLoader(ArrayDataset(x, y), batch_size=128, seed=0)
    losses = step.train_epoch(loader, epoch)      # (batches,) float64, one mean loss per step
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from npcpu import backend
from npcpu.checks import check_int
from npcpu.data.loader import DataLoader
from npcpu.dtypes import bfloat16
from npcpu.kernels.compiled_gemm import GELU, GELU_TANH, IDENTITY, RELU, TANH
from npcpu.kernels.compiled_step import (COLUMN_BLOCKS, LATE_LIMIT, SharedBuffers, StepPlan,
                                         ThreadModel, train_worker)
from npcpu.nn import activations
from npcpu.nn.linear import FusedLinearReLU, Linear
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.nn.module import Sequential
from npcpu.optim.adam import Adam, AdamW
from npcpu.optim.sgd import SGD
from npcpu.precision import to_compute, to_storage
from npcpu.train.compiled_optim import (SUPPORTED, corrections_per_step, optimizer_settings,
                                         unsupported)

OWNER = "CompiledClassifierStep"
MIN_WORK_PER_THREAD = 1 << 18  # multiply-adds per thread and step: far above a barrier's cost


def _activation_code(module):
    """The kernels' code for an activation module (npcpu.kernels.compiled_gemm), None for others."""
    if type(module) is activations.ReLU:
        return RELU
    if type(module) is activations.Tanh:
        return TANH
    if type(module) is activations.GELU:
        return GELU if module.approximate == "none" else GELU_TANH
    return None


class CompiledClassifierStep:
    """Training steps of a small MLP classifier, compiled end to end (see the module docstring).

    Parameters
    ----------
    model : Sequential of Linear / FusedLinearReLU (each Linear optionally followed by ReLU, GELU
        or Tanh), or one Linear / FusedLinearReLU
    loss_fn : CrossEntropyLoss
    optimizer : SGD, Adam or AdamW
        Over exactly the parameters of `model`.

    Raises TypeError for an unsupported kind of model, layer, loss or optimizer, and ValueError for
    an unsupported setting of a supported one; both say what is supported.
    """

    late_limit = LATE_LIMIT  # when the threads of a call leave it to one (compiled_step.StepPlan)

    def __init__(self, model, loss_fn, optimizer):
        self.layers, self.activations = self._check_model(model)
        self._check_loss(loss_fn, self.layers[-1].out_features)
        self._check_optimizer(optimizer, model)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.bf16 = self.layers[0].weight.data.dtype == bfloat16
        self.compute_dtype = self.layers[0].weight.compute_dtype  # of x, the GEMMs, the states
        self.late_meetings, self.alone_from = 0, 0  # of the last train_steps call (see there)

    # -- what is supported ----------------------------------------------------------------------
    @staticmethod
    def _check_model(model) -> tuple[list, np.ndarray]:
        """(the Linear layers, their activation codes (L,) int64)."""
        modules = list(model) if isinstance(model, Sequential) else [model]
        if not modules:
            raise unsupported("got an empty Sequential")
        layers, codes = [], []
        for i, module in enumerate(modules):
            code = _activation_code(module)
            if code is not None and layers and codes[-1] == IDENTITY \
                    and type(layers[-1]) is Linear:
                codes[-1] = code
                continue
            if type(module) not in (Linear, FusedLinearReLU):
                where = "" if code is None else " not right after a Linear"
                raise TypeError(f"CompiledClassifierStep: layer {i} is a {type(module).__name__}"
                                f"{where}; supported: {SUPPORTED}")
            if layers and module.in_features != layers[-1].out_features:
                raise ValueError(f"CompiledClassifierStep: layer {i} takes {module.in_features} "
                                 f"features but the layer before gives {layers[-1].out_features}")
            layers.append(module)
            codes.append(RELU if type(module) is FusedLinearReLU else IDENTITY)
        dtype = layers[0].weight.data.dtype
        for p in model.parameters():
            if p.data.dtype not in (np.float32, np.float64, bfloat16) or p.data.dtype != dtype:
                raise unsupported(f"parameter {p.name!r} is {p.data.dtype} (all must be float32, "
                                   f"all float64 or all bfloat16)")
            if p.frozen:
                raise unsupported(f"parameter {p.name!r} is frozen")
        if dtype == bfloat16:
            if not backend.use_native_bf16_gemm():
                raise unsupported(f"the bf16 GEMMs are {backend.bf16_gemm_path()}, and the "
                                   "compiled step rounds as the native bf16 GEMMs do only")
            if codes[-1] == TANH:
                raise unsupported("under bf16 the last Linear is followed by a Tanh (its kept "
                                   "output is rounded, the loss reads it unrounded)")
        return layers, np.array(codes, dtype=np.int64)

    @staticmethod
    def _check_loss(loss_fn, classes: int) -> None:
        if type(loss_fn) is not CrossEntropyLoss:
            raise TypeError(f"CompiledClassifierStep: loss_fn is a {type(loss_fn).__name__}; "
                            f"supported: {SUPPORTED}")
        if loss_fn.reduction != "mean" or loss_fn.label_smoothing != 0:
            raise unsupported(f"got {loss_fn!r}")
        if 0 <= loss_fn.ignore_index < classes:
            raise unsupported(f"ignore_index={loss_fn.ignore_index} is one of the {classes} classes")

    @staticmethod
    def _check_optimizer(optimizer, model) -> None:
        kind = type(optimizer).__name__
        if type(optimizer) not in (SGD, Adam, AdamW):
            raise TypeError(f"CompiledClassifierStep: optimizer is a {kind}; "
                            f"supported: {SUPPORTED}")
        if optimizer.state_dtype != "fp32":
            raise unsupported(f"{kind} has state_dtype={optimizer.state_dtype!r}")
        if any(group.get("amsgrad", False) for group in optimizer.param_groups):
            raise unsupported(f"{kind} has amsgrad=True")
        model_ids = [id(p) for p in model.parameters()]
        optimizer_ids = [id(p) for _, p in optimizer.indexed_params()]
        if sorted(model_ids) != sorted(optimizer_ids):
            raise unsupported("the optimizer's parameters are not exactly the model's")

    # -- running --------------------------------------------------------------------------------
    def train_epoch(self, loader: DataLoader, epoch: int) -> np.ndarray:
        """One epoch of `loader` (a DataLoader over a data set with `x` and `y` arrays, such as
        ArrayDataset), in the order the loader would serve epoch `epoch`; returns the losses."""
        if not isinstance(loader, DataLoader):
            raise TypeError(f"CompiledClassifierStep.train_epoch: expected a DataLoader, got "
                            f"{type(loader).__name__}")
        dataset = loader.dataset
        if not (isinstance(getattr(dataset, "x", None), np.ndarray)
                and isinstance(getattr(dataset, "y", None), np.ndarray)):
            raise TypeError(f"CompiledClassifierStep.train_epoch: the loader's data set must hold "
                            f"arrays x and y (ArrayDataset), got {type(dataset).__name__}")
        return self.train_steps(self.gemm_input(dataset.x.reshape(len(dataset.x), -1)),
                                dataset.y, loader.order(epoch), loader.batch_size,
                                steps=len(loader), x_scale=getattr(dataset, "scale", None))

    def gemm_input(self, x: np.ndarray) -> np.ndarray:
        """The features x (S, D) as layer 0's GEMMs read them: under bf16 a float32 copy of x
        rounded to the nearest bfloat16 (as npcpu.nn.linear keeps its input and the native bf16
        GEMMs read it), else x itself. train_steps takes this; make it once per data set."""
        if not self.bf16 or not isinstance(x, np.ndarray) or x.dtype != np.float32:
            return x  # train_steps names what is wrong with another x
        return to_compute(to_storage(x, bfloat16))

    def train_steps(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int, *,
                    first_batch: int = 0, steps: int | None = None, lrs=None, grad_norms=None,
                    threads: int | None = None, x_scale: float | None = None) -> np.ndarray:
        """Optimizer steps on batches order[b * batch_size : (b + 1) * batch_size] for
        b = first_batch, first_batch + 1, ... (`steps` of them; default: to the end of `order`).

        x (S, D) features in the compute dtype (under bf16: float32 holding bfloat16 values, as
        `gemm_input` makes them), or uint8 with `x_scale` (the features are x * x_scale: MNIST's
        pixels with 1 / 255, as ArrayDataset keeps them; not under bf16), y (S,) integer
        labels in [0, classes),
        order (n,) int64 sample indices. `lrs` (steps, groups): the learning rate of each
        parameter group at each step (default: the groups' "lr" throughout; the groups' "lr"
        is left as it was). `grad_norms` (steps,) float64, optional: receives each step's total
        gradient 2-norm. `threads`: default `default_threads(batch_size)`; afterwards
        `late_meetings` counts the threads' meetings at which one waited for another that was not
        running (the cores were busy with other work), and from step `alone_from` of the call
        (`steps`: never) one thread ran the steps, having found too many of them late.

        Returns the mean loss of each step taken, (steps,) float64. A step whose loss is not
        finite is not taken: the parameters stay as the step before left them, and the returned
        losses end with that loss (so fewer than `steps` steps were taken when the last one is
        not finite).
        """
        x, y, order = self._check_data(x, y, order, x_scale)
        batch_size = check_int(OWNER, "batch_size", batch_size, 1)
        first_batch = check_int(OWNER, "first_batch", first_batch, 0)
        available = -(-order.size // batch_size) - first_batch
        steps = available if steps is None else check_int(OWNER, "steps", steps, 0)
        if steps > available:
            raise ValueError(f"{OWNER}: {steps} steps from batch {first_batch} do not "
                             f"fit in an order of {order.size} samples with batch_size {batch_size}")
        threads = self.default_threads(batch_size) if threads is None else threads
        if threads not in [t for t in range(1, COLUMN_BLOCKS + 1) if COLUMN_BLOCKS % t == 0]:
            raise ValueError(f"{OWNER}: threads must divide {COLUMN_BLOCKS}, got {threads!r}")
        lrs = self._learning_rates(lrs, steps)
        if grad_norms is None:
            grad_norms = np.empty(steps, dtype=np.float64)
        elif not (isinstance(grad_norms, np.ndarray) and grad_norms.dtype == np.float64
                  and grad_norms.shape == (steps,)):
            raise ValueError(f"{OWNER}: grad_norms must be a ({steps},) float64 array")
        losses = np.empty(steps, dtype=np.float64)
        if steps == 0:
            return losses
        arguments = self._kernel_arguments(x, x_scale, y, order, batch_size, first_batch, steps,
                                           lrs, threads, losses, grad_norms)
        helpers = [threading.Thread(target=train_worker, args=arguments[t], daemon=True)
                   for t in range(1, threads)]
        for helper in helpers:
            helper.start()
        taken = train_worker(*arguments[0])
        for helper in helpers:
            helper.join()
        if self.bf16:  # thread 0's float32 copies hold the new bf16 values: stored exactly
            model = arguments[0][3]
            for layer, weight, bias in zip(self.layers, model.weights, model.biases):
                layer.weight.data[...] = to_storage(weight, bfloat16)
                if layer.bias is not None:
                    layer.bias.data[...] = to_storage(bias, bfloat16)
        shared = arguments[0][-1]
        self.late_meetings = int(shared.late_meetings.sum())
        self.alone_from = int(shared.alone_from[0])
        for _, p in self.optimizer.indexed_params():
            self.optimizer.state[self.optimizer.index_of(p)]["step"] += taken
        return losses[:taken + 1] if taken < steps else losses

    def default_threads(self, batch_size: int) -> int:
        """Threads for a step: Numba's thread count (npcpu.backend.set_threads), at most
        COLUMN_BLOCKS, fewer when a thread would get less than MIN_WORK_PER_THREAD multiply-adds
        of layer 0's two GEMMs (the part the threads share; then waiting for each other costs
        more than a second core saves)."""
        work = 2 * batch_size * self.layers[0].in_features * self.layers[0].out_features
        threads = max(1, min(numba.get_num_threads(), COLUMN_BLOCKS, work // MIN_WORK_PER_THREAD))
        while COLUMN_BLOCKS % threads:
            threads -= 1
        return threads

    def _learning_rates(self, lrs, steps: int) -> np.ndarray:
        groups = self.optimizer.param_groups
        if lrs is None:
            return np.tile([float(group["lr"]) for group in groups], (steps, 1))
        lrs = np.asarray(lrs, dtype=np.float64)
        if lrs.shape != (steps, len(groups)) or not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            raise ValueError(f"{OWNER}: lrs must be ({steps}, {len(groups)}) "
                             f"finite learning rates >= 0, got shape {lrs.shape}")
        return lrs

    def check_scale(self, x_scale) -> None:
        """Refuse uint8 features with a scale under bf16 (ValueError): the reference rounds
        x * scale to bfloat16, the compiled step scales layer 0's sums."""
        if self.bf16 and x_scale is not None:
            raise unsupported("uint8 features with a scale under bf16 (the reference rounds "
                               "x * scale to bfloat16; the compiled step scales layer 0's sums)")

    def _check_data(self, x, y, order, x_scale):
        features, classes = self.layers[0].in_features, self.layers[-1].out_features
        self.check_scale(x_scale)
        expected = np.uint8 if x_scale is not None else self.compute_dtype
        if not isinstance(x, np.ndarray) or x.dtype != expected:
            got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            hint = "uint8 pixels need an x_scale" if x_scale is None else "x_scale is for uint8 x"
            raise TypeError(f"{OWNER}: x must be a {np.dtype(expected)} array, got {got} ({hint})")
        if x_scale is not None and not (np.isfinite(x_scale) and x_scale > 0):
            raise ValueError(f"{OWNER}: x_scale must be a positive finite number, got {x_scale!r}")
        if x.ndim != 2 or x.shape[1] != features:
            raise ValueError(f"{OWNER}: x must be (samples, {features}), got {x.shape}")
        if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.shape != x.shape[:1]:
            got = (y.dtype, y.shape) if isinstance(y, np.ndarray) else type(y).__name__
            raise ValueError(f"{OWNER}: y must be integer labels of shape ({len(x)},), got {got}")
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"{OWNER}: labels must be in [0, {classes}), got [{y.min()}, {y.max()}]")
        order = np.asarray(order)
        if order.ndim != 1 or order.dtype.kind not in "iu" or (
                order.size and (order.min() < 0 or order.max() >= len(x))):
            raise ValueError(f"{OWNER}: order must be 1-D integer indices in [0, {len(x)})")
        return (np.ascontiguousarray(x), np.ascontiguousarray(y, dtype=np.int64),
                np.ascontiguousarray(order, dtype=np.int64))

    def _kernel_arguments(self, x, x_scale, y, order, batch_size, first_batch, steps, lrs, threads,
                          losses, grad_norms) -> list:
        """train_worker's arguments for each thread (npcpu.kernels.compiled_step.train_worker):
        thread 0 works on the model's own arrays; every other thread on copies of all but W_0
        and its optimizer state, which the threads share by columns. The activations, dz and
        the row groups' gradients are shared: each thread writes its own row groups."""
        settings = optimizer_settings(self.optimizer, self.layers)
        weights, biases = settings["weights"], settings["biases"]
        if self.bf16:  # float32 copies of the bf16 values (train_steps stores them back)
            weights = tuple(w.astype(np.float32) for w in weights)
            biases = tuple(b.astype(np.float32) for b in biases)
        first_moments, second_moments = settings["first_moments"], settings["second_moments"]
        masters = settings["masters"]
        dtype = weights[0].dtype
        group_index = settings["group_index"]
        lrs = np.ascontiguousarray(lrs[:, group_index])
        corrections = corrections_per_step(self.optimizer, steps, settings["steps_taken"],
                                           group_index)
        partials = _cache_line_aligned((2, COLUMN_BLOCKS, batch_size, weights[0].shape[0]), dtype)
        counter, block_squares = _cache_line_aligned(1, np.int64), np.zeros((2, COLUMN_BLOCKS))
        acts = tuple(np.empty((batch_size, w.shape[0]), dtype) for w in weights)
        no_array = np.empty((0, 0), dtype)
        pre_acts = tuple(np.empty((batch_size, w.shape[0]), dtype) if code in (GELU, GELU_TANH)
                         else no_array for w, code in zip(weights, self.activations))
        dzs = tuple(np.empty((batch_size, w.shape[0]), dtype) for w in weights)
        # W_0's gradient is not computed by row group
        group_weight_grads = tuple(np.empty_like(w) if l else no_array
                                   for _ in range(COLUMN_BLOCKS) for l, w in enumerate(weights))
        group_bias_grads = tuple(np.empty_like(b) for _ in range(COLUMN_BLOCKS) for b in biases)
        plan = StepPlan(x=x, x_scale=dtype.type(1 if x_scale is None else x_scale), y=y,
                        order=order, batch_size=batch_size, first_batch=first_batch, steps=steps,
                        lrs=lrs, corrections=corrections, steps_taken=settings["steps_taken"],
                        late_limit=np.array(self.late_limit, dtype=np.float64))
        shared = SharedBuffers(counter=counter, partials=partials, acts=acts, pre_acts=pre_acts,
                               dzs=dzs, group_weight_grads=group_weight_grads,
                               group_bias_grads=group_bias_grads,
                               group_losses=np.zeros(COLUMN_BLOCKS), block_squares=block_squares,
                               batch_rows=np.arange(batch_size),
                               targets=np.empty(batch_size, np.int64),
                               row_losses=np.empty(batch_size), losses=losses, grad_norms=grad_norms,
                               late_meetings=np.zeros(threads, np.int64),
                               alone_from=np.full(1, steps, np.int64))
        arguments = []
        for thread in range(threads):
            if thread:  # own copies of everything above W_0 (they stay bitwise equal)
                weights = weights[:1] + tuple(w.copy() for w in weights[1:])
                biases = tuple(b.copy() for b in biases)
                first_moments = first_moments[:1] + tuple(m.copy() for m in first_moments[1:])
                second_moments = second_moments[:1] + tuple(m.copy() for m in second_moments[1:])
                masters = masters[:1] + tuple(m.copy() for m in masters[1:])
            # g_W0 too is per thread (each fills its own columns): two threads writing the two
            # ends of one cache line of a shared g_W0 made two threads slower than one.
            model = ThreadModel(weights=weights, biases=biases, activations=self.activations,
                                adam=settings["adam"], first_moments=first_moments,
                                second_moments=second_moments, hyper=settings["hyper"],
                                flags=settings["flags"], storage=settings["storage"],
                                masters=masters, tensor_index=settings["tensor_index"],
                                seed=settings["seed"], bf16_inputs=self.bf16,
                                grad_weights=tuple(np.empty_like(w) for w in weights),
                                grad_biases=tuple(np.empty_like(b) for b in biases))
            arguments.append((thread, threads, plan, model, shared))
        return arguments


def _cache_line_aligned(shape, dtype) -> np.ndarray:
    """np.zeros(shape, dtype) starting on a 64-byte boundary, so that blocks of it written by
    different threads share no cache line when their sizes are multiples of 64 bytes."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)
