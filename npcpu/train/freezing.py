"""Dynamic layer freezing: stop training layers whose gradients have gone quiet.

A layer's signal is the norm of its accumulated, unscaled gradient (all its parameters together),
averaged over a sliding window of the last `window` optimizer steps. A layer qualifies when that
average has stayed under `threshold` for `patience` consecutive steps.

By default only a prefix of the network freezes: layer i freezes when it and every layer below it
qualify (or are frozen already). A frozen prefix is what lets the backward pass stop early, so it
saves the dx GEMMs as well as the dW GEMMs and the optimizer's update. With `prefix_only=False` any
qualifying layer freezes (saving its dW GEMM and its update, but not the backward pass through it).

A frozen layer's parameters get `frozen = True`: the optimizer leaves them out entirely (no momentum
drift, no decay) and their gradient buffers are released.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.optim.clip import get_total_norm


class DynamicFreezer:
    """Freeze layers whose windowed gradient norm stays below `threshold` for `patience` steps.

    Parameters
    ----------
    threshold : float
        Gradient-norm level under which a layer counts as quiet (absolute, or relative to the
        layer's weight norm when `relative=True`: ||g|| / ||w||).
    patience : int
        Consecutive optimizer steps a layer must stay quiet before it freezes.
    window : int
        Number of recent steps whose gradient norms are averaged.
    prefix_only : bool
        Freeze only a prefix of the layers (default; see the module docstring).
    relative : bool
        Compare ||g|| / ||w|| instead of ||g|| with the threshold.
    min_active : int
        Layers (counted from the output) that never freeze; the output layer stays trainable.
    start_step : int
        No layer counts as quiet before this optimizer step. Gradients are small at the start of
        training (during a learning-rate warmup above all) without the layer having learned
        anything: freezing then would stop training before it began.
    """

    def __init__(self, threshold: float = 0.01, patience: int = 30, window: int = 10, *,
                 prefix_only: bool = True, relative: bool = False, min_active: int = 1,
                 start_step: int = 0):
        owner = "DynamicFreezer"
        self.threshold = check_real(owner, "threshold", threshold, low=0.0, low_open=True)
        self.patience = check_int(owner, "patience", patience, 1)
        self.window = check_int(owner, "window", window, 1)
        self.prefix_only = prefix_only
        self.relative = relative
        self.min_active = check_int(owner, "min_active", min_active, 0)
        self.start_step = check_int(owner, "start_step", start_step, 0)
        self.history: dict[str, deque] = {}
        self.quiet_steps: dict[str, int] = {}
        self.frozen_at: dict[str, int] = {}  # layer name -> optimizer step at which it froze

    @staticmethod
    def layers(model) -> list[tuple[str, object]]:
        """The layers the freezer watches: the model's direct children that hold parameters."""
        children = list(model.named_children()) or [("", model)]
        return [(name, layer) for name, layer in children if layer.parameters()]

    def layer_signal(self, layer, gradient_norm=get_total_norm) -> float | None:
        """||g|| (or ||g|| / ||w||) over the layer's parameters; None if it has no gradient yet.
        `gradient_norm(params)`: the norm of their gradients (a data-parallel run whose ranks
        each hold only some of the summed gradients gives the norm from their owners)."""
        params = [p for p in layer.parameters() if p.grad is not None]
        if not params:
            return None
        norm = gradient_norm(params)
        if self.relative:
            weight_norm = math.sqrt(sum(float(np.vdot(w, w)) for w in (p.values() for p in params)))
            return norm / max(weight_norm, 1e-12)
        return norm

    def observe(self, model, step: int, gradient_norm=get_total_norm) -> list[str]:
        """Record this step's gradient norms (after unscaling, before the update; each layer's
        by `gradient_norm`, see `layer_signal`); freeze layers.

        Returns the names of the layers frozen at this step.
        """
        layers = self.layers(model)
        watched = layers[: max(len(layers) - self.min_active, 0)]
        qualifies = []
        for name, layer in watched:
            if name in self.frozen_at:
                qualifies.append(True)
                continue
            signal = self.layer_signal(layer, gradient_norm)
            if signal is not None:
                self.history.setdefault(name, deque(maxlen=self.window)).append(signal)
            history = self.history.get(name)
            quiet = step >= self.start_step and bool(history) and len(history) == self.window \
                and float(np.mean(history)) < self.threshold
            self.quiet_steps[name] = self.quiet_steps.get(name, 0) + 1 if quiet else 0
            qualifies.append(self.quiet_steps[name] >= self.patience)

        newly_frozen = []
        for (name, layer), ok in zip(watched, qualifies):
            if self.prefix_only and not ok:
                break
            if ok and name not in self.frozen_at:
                self._freeze(layer)
                self.frozen_at[name] = step
                newly_frozen.append(name)
        return newly_frozen

    @staticmethod
    def _freeze(layer) -> None:
        layer.freeze()
        for p in layer.parameters():
            p.grad = None

    def apply(self, model) -> None:
        """Re-freeze the recorded layers on a model (after loading a checkpoint)."""
        by_name = dict(self.layers(model))
        for name in self.frozen_at:
            if name not in by_name:
                raise ValueError(f"DynamicFreezer: checkpoint froze layer {name!r}, which the model "
                                 f"does not have (layers: {sorted(by_name)})")
            self._freeze(by_name[name])

    def state_dict(self) -> dict:
        return {
            "threshold": self.threshold, "patience": self.patience, "window": self.window,
            "prefix_only": self.prefix_only, "relative": self.relative,
            "min_active": self.min_active, "start_step": self.start_step,
            "history": {name: list(h) for name, h in self.history.items()},
            "quiet_steps": dict(self.quiet_steps),
            "frozen_at": dict(self.frozen_at),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("threshold", "patience", "window", "prefix_only", "relative", "min_active",
                    "start_step"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"DynamicFreezer.load_state_dict: {key} is {getattr(self, key)!r} "
                                 f"here but {state.get(key)!r} in the checkpoint")
        self.history = {name: deque(h, maxlen=self.window) for name, h in state["history"].items()}
        self.quiet_steps = {name: int(v) for name, v in state["quiet_steps"].items()}
        self.frozen_at = {name: int(v) for name, v in state["frozen_at"].items()}
