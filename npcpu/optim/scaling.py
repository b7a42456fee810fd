"""Dynamic loss scaling for float16 training, with torch.amp.GradScaler's semantics.

Small float16 gradients flush to zero; multiplying the loss gradient by a large scale S keeps them
representable through the backward pass, and dividing every parameter gradient by S before the
optimizer step undoes it. Too large an S overflows some gradient to Inf/NaN: that step is skipped
and S shrinks; after `growth_interval` finite steps in a row S grows again. One iteration:

    dlogits = loss.backward()
    model.backward(scaler.scale_loss_grad(dlogits))   # gradients are S * dL/dparam
    scaler.unscale_(optimizer)                        # optional: gradients are dL/dparam (for clipping)
    clip_grad_norm(params, max_norm)                  # optional
    scaler.step(optimizer)                            # unscale_ if not done; step only if all finite
    scaler.update()                                   # back off or grow S

The update rule is torch's ``_amp_update_scale_``, with S kept as a float32 value as torch keeps it
(each new S is computed in float64 and rounded to float32):

    found Inf/NaN:   S <- S * backoff_factor,  growth_tracker <- 0
    otherwise:       growth_tracker += 1; when it reaches growth_interval:
                     S <- S * growth_factor (only if that is finite in float32), growth_tracker <- 0

A scaler serves one optimizer per iteration (the Trainer's case); torch's per-optimizer bookkeeping
for several optimizers sharing one scaler is not reproduced. Frozen parameters and parameters
without a gradient are left alone.
"""

from __future__ import annotations

import math

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.kernels.grads import EXPONENT_MASKS, unscale_and_count_nonfinite

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


def trainable_gradients(params_or_optimizer) -> list[np.ndarray]:
    """The gradient accumulators of the unfrozen parameters that have one, from an optimizer's param
    groups or from an iterable of Parameters, each checked to be a float32/float64 C-contiguous
    array. They are the accumulators themselves (`Parameter.grad_buffer()`), for modifying in place."""
    if hasattr(params_or_optimizer, "param_groups"):
        params = [p for group in params_or_optimizer.param_groups for p in group["params"]]
    else:
        params = list(params_or_optimizer)
    grads = []
    for p in params:
        if getattr(p, "frozen", False) or p.grad is None:
            continue
        grad = p.grad_buffer()
        if not isinstance(grad, np.ndarray) or grad.dtype not in EXPONENT_MASKS:
            raise TypeError(f"{p!r}: gradient must be a float32 or float64 array, got "
                            f"{getattr(grad, 'dtype', type(grad).__name__)}")
        if not grad.flags.c_contiguous:
            raise ValueError(f"{p!r}: gradient must be C-contiguous to be modified in place")
        grads.append(grad)
    return grads


def _as_float32_value(value: float) -> float:
    """`value` rounded to float32 (Inf past float32's range), returned as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _check_float32_real(name: str, value, **bounds) -> float:
    """`check_real`, and also finite once rounded to float32 (the scale is a float32)."""
    value = check_real("DynamicLossScaler", name, value, **bounds)
    if not math.isfinite(_as_float32_value(value)):
        raise ValueError(f"DynamicLossScaler: {name} must be finite in float32, got {value}")
    return value


class DynamicLossScaler:
    """Scale the loss gradient up, unscale parameter gradients, skip steps that overflowed.

    Parameters
    ----------
    init_scale : float
        The starting scale S (rounded to float32), > 0 and finite.
    growth_factor : float
        > 1: S is multiplied by it after `growth_interval` consecutive finite steps.
    backoff_factor : float
        In (0, 1): S is multiplied by it after a step with an Inf/NaN gradient.
    growth_interval : int
        >= 1.
    enabled : bool
        False makes every method a pass-through: no scaling, every step taken, `scale` is 1.

    Attributes
    ----------
    skipped_steps : int
        How many `step` calls skipped the optimizer step because of an Inf/NaN gradient.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        self.enabled = bool(enabled)
        self._set_settings(growth_factor, backoff_factor, growth_interval)
        self._scale = _as_float32_value(_check_float32_real("init_scale", init_scale, low=0.0, low_open=True))
        self._growth_tracker = 0
        self.skipped_steps = 0
        self._stage = _READY
        self._found_inf = False

    def _set_settings(self, growth_factor, backoff_factor, growth_interval) -> None:
        owner = "DynamicLossScaler"
        growth_factor = _check_float32_real("growth_factor", growth_factor, low=1.0, low_open=True)
        backoff_factor = check_real(owner, "backoff_factor", backoff_factor, low=0.0, high=1.0,
                                    low_open=True, high_open=True)
        growth_interval = check_int(owner, "growth_interval", growth_interval, 1)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval

    @property
    def scale(self) -> float:
        """The current scale S (1.0 when disabled)."""
        return self._scale if self.enabled else 1.0

    def get_scale(self) -> float:
        """The current scale S, under torch's name."""
        return self.scale

    def scale_loss_grad(self, dlogits: np.ndarray) -> np.ndarray:
        """``S * dL/dlogits``, a new array of the same dtype: what the backward pass starts from."""
        if not isinstance(dlogits, np.ndarray) or dlogits.dtype.kind != "f":
            raise TypeError(f"DynamicLossScaler.scale_loss_grad: expected a floating-point array, got "
                            f"{getattr(dlogits, 'dtype', type(dlogits).__name__)}")
        if not self.enabled:
            return dlogits
        with np.errstate(over="ignore"):  # an overflow here is what unscale_ detects
            return dlogits * dlogits.dtype.type(self._scale)

    def unscale_(self, params_or_optimizer) -> bool:
        """Multiply every gradient by 1/S in place; return whether any entry was Inf or NaN.

        Each entry is tested on its exponent bits before it is scaled; 1/S is computed in float64
        and rounded to float32, as torch does. Allowed once per iteration, before `step`
        (RuntimeError otherwise, as torch); `update` starts the next iteration.
        """
        if not self.enabled:
            return False
        if self._stage == _UNSCALED:
            raise RuntimeError("DynamicLossScaler.unscale_: already called since the last update()")
        if self._stage == _STEPPED:
            raise RuntimeError("DynamicLossScaler.unscale_: called after step(); call update() first")
        inv_scale = np.float32(1.0 / self._scale)
        nonfinite = 0
        for grad in trainable_gradients(params_or_optimizer):
            flat = grad.reshape(-1)
            bits_dtype = EXPONENT_MASKS[flat.dtype].dtype
            nonfinite += unscale_and_count_nonfinite(flat, flat.view(bits_dtype), EXPONENT_MASKS[flat.dtype],
                                                     flat.dtype.type(inv_scale))
        self._found_inf = nonfinite > 0
        self._stage = _UNSCALED
        return self._found_inf

    def step(self, optimizer) -> bool:
        """`unscale_` (unless done this iteration), then ``optimizer.step()`` only if every gradient
        is finite. Returns whether the optimizer stepped."""
        if not self.enabled:
            optimizer.step()
            return True
        if self._stage == _STEPPED:
            raise RuntimeError("DynamicLossScaler.step: already called since the last update()")
        if self._stage == _READY:
            self.unscale_(optimizer)
        self._stage = _STEPPED
        if self._found_inf:
            self.skipped_steps += 1
            return False
        optimizer.step()
        return True

    def update(self, new_scale: float | None = None) -> None:
        """Back off after an Inf/NaN, or count a good step and grow S after `growth_interval` of them.

        With `new_scale`, set S to it instead (the growth tracker is kept), as torch's update does.
        """
        if not self.enabled:
            return
        if new_scale is not None:
            self._scale = _as_float32_value(_check_float32_real("new_scale", new_scale, low=0.0, low_open=True))
        elif self._stage == _READY:
            raise RuntimeError("DynamicLossScaler.update: no unscale_() or step() since the last update()")
        elif self._found_inf:
            self._scale = _as_float32_value(self._scale * self.backoff_factor)
            self._growth_tracker = 0
        elif self._growth_tracker + 1 == self.growth_interval:
            grown = _as_float32_value(self._scale * self.growth_factor)
            if math.isfinite(grown):
                self._scale = grown
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
        self._stage = _READY
        self._found_inf = False

    def state_dict(self) -> dict:
        """torch.amp.GradScaler's keys (so either loads the other's), plus ``skipped_steps``;
        empty when disabled, as torch's. Save it after `update`."""
        if not self.enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()` (a no-op when disabled, as torch's)."""
        if not self.enabled:
            return
        if not state_dict:
            raise ValueError("DynamicLossScaler.load_state_dict: the state dict is empty (saved from a "
                             "disabled scaler?)")
        self._set_settings(state_dict["growth_factor"], state_dict["backoff_factor"],
                           state_dict["growth_interval"])
        self._scale = _as_float32_value(_check_float32_real("scale", state_dict["scale"], low=0.0, low_open=True))
        self._growth_tracker = int(state_dict["_growth_tracker"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._stage = _READY
        self._found_inf = False

    def __repr__(self) -> str:
        if not self.enabled:
            return "DynamicLossScaler(enabled=False)"
        return (f"DynamicLossScaler(scale={self._scale}, growth_tracker={self._growth_tracker}, "
                f"skipped_steps={self.skipped_steps})")
