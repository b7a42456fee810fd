"""Losses: `loss = loss_fn(outputs, targets)` gives a float; `loss_fn.backward()` gives dL/doutputs.

A loss has no parameters, so it is not a Module. It keeps what its backward needs (the gradient
itself, computed in the same pass as the loss) and returns it from `backward()` in the compute
dtype: float32, or float64 when the outputs are float64 (gradient checks).

Gradient accumulation: the Trainer wants the mean over a WINDOW of several micro-batches, not over
each micro-batch. Pass `normalizer` (the window's count) to every call: with reduction "mean" the
loss and its gradient are then divided by `normalizer` instead of this batch's own count, so the
micro-batch losses and gradients add up to the window's mean. With reduction "sum" there is
nothing to divide, and `normalizer` is ignored.

NaN or Inf in the outputs gives a NaN or Inf loss (and gradient), never an exception: the dynamic
loss scaler relies on seeing it.
"""

from __future__ import annotations

import numpy as np

from npcpu.checks import check_real
from npcpu.dtypes import HALF_DTYPES
from npcpu.kernels.launch import for_size
from npcpu.kernels.pairwise_sum import BLOCK as SUM_BLOCK, block_sum
from npcpu.kernels.softmax import (cross_entropy_forward_backward,
                                   cross_entropy_forward_backward_serial, target_bounds)
from npcpu.precision import to_compute

REDUCTIONS = ("mean", "sum")
_FLOAT64, _FLOAT32 = np.dtype(np.float64), np.dtype(np.float32)  # made once: read on every call


class Loss:
    """Base class: `__call__` runs `forward`, `backward()` returns the gradient it computed."""

    def __init__(self, reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, "
                             f"got {reduction!r}")
        self.reduction = reduction
        self._grad: np.ndarray | None = None

    def forward(self, outputs: np.ndarray, targets: np.ndarray, normalizer: float | None = None
                ) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, outputs: np.ndarray, targets: np.ndarray, normalizer: float | None = None
                 ) -> float:
        return self.forward(outputs, targets, normalizer)

    def backward(self) -> np.ndarray:
        """dL/doutputs from the last forward, shaped as the outputs.

        The array is the loss's own buffer: the next forward may overwrite it.
        """
        if self._grad is None:
            raise RuntimeError(f"{self!r}: backward() called before forward()")
        return self._grad

    def evaluation_sums(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """This batch's sums of the metrics an evaluation reports besides the loss, by name.

        Trainer.evaluate adds them up over the data and hands the totals to
        `evaluation_metrics`. A plain loss has none (an MSELoss run reports its loss only).
        """
        return {}

    def evaluation_metrics(self, loss: float, sums: dict[str, float], samples: int) -> dict:
        """The metrics of an evaluation from its mean loss and the totals of `evaluation_sums`:
        the loss, and each total per sample. Trainer.evaluate reports them as "eval_<name>"; a
        loss whose metrics are not per-sample means (perplexity, tokens) overrides this."""
        return {"loss": loss, **{name: total / samples for name, total in sums.items()}}

    def _outputs_in_compute_dtype(self, outputs) -> np.ndarray:
        """Floating outputs as a contiguous float32 (float64 stays float64) array."""
        if not isinstance(outputs, np.ndarray):
            raise TypeError(f"{self!r}: expected a NumPy array of outputs, got {type(outputs).__name__}")
        if outputs.dtype.kind != "f" and outputs.dtype not in HALF_DTYPES:
            raise TypeError(f"{self!r}: expected floating-point outputs, got dtype {outputs.dtype}")
        dtype = _FLOAT64 if outputs.dtype == _FLOAT64 else _FLOAT32
        return np.ascontiguousarray(to_compute(outputs, dtype))

    def _divisor(self, count: int, normalizer: float | None, per_unit: int = 1) -> float:
        """What the summed loss is divided by: 1 ("sum"), else this batch's `count`, or
        `normalizer * per_unit` when a normalizer is given."""
        if self.reduction == "sum":
            return 1.0
        if normalizer is None:
            return float(count)
        return check_real(repr(self), "normalizer", normalizer, low=0.0, low_open=True, allow_inf=True) * per_unit

    def _gradient_buffer(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """The gradient array, reused from the last call when shape and dtype agree."""
        if self._grad is None or self._grad.shape != shape or self._grad.dtype != dtype:
            self._grad = np.empty(shape, dtype=dtype)
        return self._grad

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy on unnormalized logits and integer class targets (torch semantics).

    Parameters
    ----------
    ignore_index : int
        Rows whose target equals it add nothing to the loss, the gradient or the mean's count.
    label_smoothing : float in [0, 1]
        eps: the target distribution is (1 - eps) * onehot(target) + eps / C.
    reduction : {"mean", "sum"}
        "mean" divides by the number of non-ignored targets (or by `normalizer`).
    classes : int or None
        The number of real classes C when the logits' last dimension P is larger (vocabulary
        padding, e.g. 50257 words in 50304 columns): columns C .. P - 1 are left out of the softmax
        and get a zero gradient. None: every column is a class.
    in_place : bool
        Write dL/dlogits over the logits array passed to `forward` (float32 or float64 and
        C-contiguous; otherwise over the converted copy) instead of into a buffer of the same
        size: for a large vocabulary, one (N, P) array fewer. The caller must not read the
        logits after the call (Trainer.evaluate takes `evaluation_sums` before the loss), and
        `backward()` returns the gradient once, without keeping it.

    Notes
    -----
    logits are (N, C) or (N, T, C), or generally (..., C) with targets (...,): the class dimension
    is LAST. torch puts it at dim 1 for more than two dimensions, so compare an (N, T, C) call with
    torch's `cross_entropy(logits.reshape(-1, C), targets.reshape(-1))` (or with logits permuted
    to (N, C, T)).

    With q the target distribution of a row and p = softmax(logits) (through a stable
    log-sum-exp, lse = max + log sum exp(logits - max)):

        loss_row = sum_c q_c * (lse - logits_c)
        L = sum over non-ignored rows of loss_row / divisor
        dL/dlogits_row = (p - q) / divisor        (zero for an ignored row)

    divisor = number of non-ignored targets, or `normalizer` when given ("mean"); 1 for "sum".
    One fused kernel computes the loss and the gradient in the same pass; `backward()` returns it.
    As in torch, a "mean" over a batch whose targets are all ignored is NaN, with a zero gradient.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 reduction: str = "mean", *, classes: int | None = None, in_place: bool = False):
        super().__init__(reduction)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], "
                             f"got {label_smoothing!r}")
        if classes is not None and (not isinstance(classes, (int, np.integer)) or classes < 1):
            raise ValueError(f"CrossEntropyLoss: classes must be a positive int or None, "
                             f"got {classes!r}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.classes = None if classes is None else int(classes)
        self.in_place = bool(in_place)
        self._losses: np.ndarray | None = None  # _row_losses

    def forward(self, logits: np.ndarray, targets: np.ndarray, normalizer: float | None = None
                ) -> float:
        logits = self._outputs_in_compute_dtype(logits)
        targets, count = self._check_targets(logits, targets)
        columns = logits.shape[-1]
        divisor = self._divisor(count, normalizer)
        losses = self._row_losses(targets.size)
        if self.in_place:
            dlogits = self._grad = logits
        else:
            dlogits = self._gradient_buffer(logits.shape, logits.dtype)
        kernel = for_size(cross_entropy_forward_backward, cross_entropy_forward_backward_serial,
                          logits.size)
        if logits.ndim != 2:  # the kernel takes rows of logits
            dlogits, logits, targets = (dlogits.reshape(-1, columns), logits.reshape(-1, columns),
                                        targets.reshape(-1))
        kernel(losses, dlogits, logits, targets, self.ignore_index, self.label_smoothing,
               1.0 / divisor if divisor > 0 else 0.0, self._classes(columns))
        if divisor == 0:  # every target ignored: torch's 0 / 0
            return float("nan")
        total = block_sum(losses) if losses.size <= SUM_BLOCK else float(np.add.reduce(losses))
        return total / divisor

    def _row_losses(self, rows: int) -> np.ndarray:
        """The kernel's per-row losses (rows,) float64: a workspace reused while the row count is
        the same (read only inside forward)."""
        losses = self._losses
        if losses is None or losses.size != rows:
            losses = self._losses = np.empty(rows, dtype=np.float64)
        return losses

    def backward(self) -> np.ndarray:
        """As Loss.backward; with `in_place`, the gradient (written over the logits) is returned
        once and not kept, so that it is freed with the model's backward pass instead of being
        held into the next step's forward (a second logits-sized array at the peak)."""
        grad = super().backward()
        if self.in_place:
            self._grad = None
        return grad

    def evaluation_sums(self, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """{"accuracy": rows whose largest logit (among the real classes) is the target} (ignored
        rows count as wrong)."""
        real = logits[..., :self._classes(logits.shape[-1])]
        return {"accuracy": int(np.count_nonzero(np.argmax(real, axis=-1) == targets))}

    def _classes(self, columns: int) -> int:
        """C, the real classes among the logits' `columns`."""
        if self.classes is None:
            return columns
        if self.classes > columns:
            raise ValueError(f"{self!r}: classes={self.classes} but the logits have only {columns} "
                             "columns")
        return self.classes

    def _check_targets(self, logits: np.ndarray, targets) -> tuple[np.ndarray, int]:
        """Integer targets of shape logits.shape[:-1], each in [0, C) or equal to ignore_index, as
        contiguous int64; and how many of them are not ignore_index."""
        if not isinstance(targets, np.ndarray) or targets.dtype.kind not in "iu":
            got = targets.dtype if isinstance(targets, np.ndarray) else type(targets).__name__
            raise TypeError(f"{self!r}: targets must be an integer array of class indices, got {got}")
        if logits.ndim < 2 or targets.shape != logits.shape[:-1]:
            raise ValueError(f"{self!r}: expected logits (..., C) and targets of the leading shape, "
                             f"got logits {logits.shape} and targets {targets.shape}")
        classes = self._classes(logits.shape[-1])
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        # the usual batch is checked in one pass; the mask below only when it fails
        in_range = False
        if targets.size:
            low, high = target_bounds(targets if targets.ndim == 1 else targets.reshape(-1))
            in_range = 0 <= low and high < classes
        if not in_range:
            bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= classes))
            if bad.any():
                raise ValueError(f"{self!r}: target {targets[bad][0]} is out of range "
                                 f"[0, {classes}) (and is not ignore_index={self.ignore_index})")
        if in_range and not 0 <= self.ignore_index < classes:
            return targets, targets.size  # no target can be ignore_index
        return targets, int(np.count_nonzero(targets != self.ignore_index))

    def extra_repr(self) -> str:
        padding = "" if self.classes is None else f", classes={self.classes}"
        in_place = ", in_place=True" if self.in_place else ""
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}{padding}{in_place}")


class MSELoss(Loss):
    """Mean squared error between outputs and float targets of the same shape.

    Notes
    -----
    With d = outputs - targets over all elements, outputs of shape (N, ...) and F = size / N
    features per sample:

        L = sum(d^2) / divisor,   dL/doutputs = 2 * d / divisor

    divisor = N * F (every element, as torch's "mean") or, when `normalizer` is given, the number
    of SAMPLES in the accumulation window times F, so that the micro-batch losses of a window add
    up to its mean over all of its elements; 1 for "sum".
    """

    def forward(self, outputs: np.ndarray, targets: np.ndarray, normalizer: float | None = None
                ) -> float:
        outputs = self._outputs_in_compute_dtype(outputs)
        if not isinstance(targets, np.ndarray) or \
                (targets.dtype.kind != "f" and targets.dtype not in HALF_DTYPES):
            got = targets.dtype if isinstance(targets, np.ndarray) else type(targets).__name__
            raise TypeError(f"{self!r}: targets must be a floating-point array, got {got}")
        if outputs.ndim < 1 or targets.shape != outputs.shape:
            raise ValueError(f"{self!r}: outputs and targets must have the same shape, got outputs "
                             f"{outputs.shape} and targets {targets.shape}")
        features = outputs.size // outputs.shape[0] if outputs.shape[0] else 0
        divisor = self._divisor(outputs.size, normalizer, per_unit=features)
        diff = self._gradient_buffer(outputs.shape, outputs.dtype)
        np.subtract(outputs, to_compute(targets, outputs.dtype), out=diff)
        squared_sum = float(np.sum(np.square(diff), dtype=np.float64))
        if divisor == 0:  # an empty batch: torch's 0 / 0
            return float("nan")
        diff *= 2.0 / divisor  # the gradient, in place
        return squared_sum / divisor
