"""Lookahead around any optimizer (Zhang, Lucas, Hinton & Ba, arXiv 1907.08610, Algorithm 1)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.kernels import optim as kernels
from npcpu.kernels.optim_io import Rounding, random_scratch
from npcpu.optim.optimizer import Optimizer, flat
from npcpu.precision import bfloat16, to_storage


class Lookahead:
    """k fast steps of the inner optimizer, then pull slow weights toward the fast ones.

    The paper's Algorithm 1 keeps slow weights phi and fast weights theta:

        for t = 1, 2, ...:
            theta_{t,0} = phi_{t-1}
            for i = 1..k:  theta_{t,i} = theta_{t,i-1} + A(L, theta_{t,i-1})     (inner optimizer)
            phi_t = phi_{t-1} + alpha (theta_{t,k} - phi_{t-1})

    Unrolled into single calls: every call of `step()` is one inner step (theta <- theta + A);
    every k-th call also does phi <- phi + alpha (theta - phi) and theta <- phi, which is the
    outer update followed by the next cycle's theta_{t+1,0} = phi_t.

    - phi_0 is a copy of the parameters when Lookahead is built (not taken lazily at the first step).
    - k counts calls to `step()`; the inner optimizer's state (moments) is kept across syncs, as
      in the paper's experiments and in timm and optax.
    - `param_groups` is the inner optimizer's list itself, so schedules that write group["lr"] act on
      it; `zero_grad` is forwarded.
    - Slow weights are kept in the compute dtype (float32 for 16-bit parameters). A parameter with
      an fp32 master copy syncs the master; bf16 parameters without one are rounded like the inner
      optimizer rounds them (stochastically by default). Frozen parameters are not synced.

    Parameters
    ----------
    optimizer : Optimizer
    k : int, >= 1
    alpha : float, in (0, 1]
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Lookahead: optimizer must be an npcpu Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.k = check_int("Lookahead", "k", k, 1)
        self.alpha = check_real("Lookahead", "alpha", alpha, low=0.0, low_open=True, high=1.0)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.step_count = 0
        self.slow_weights = {index: optimizer.param_values(p) for index, p in optimizer.indexed_params()}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    # -- the rest of what the Trainer calls (npcpu.optim.protocol.TrainerOptimizer) -------------
    fused_into_backward = False

    def fuse_into_backward(self) -> None:
        """Refused: the sync every k steps reads every parameter's fast weights after its step,
        which an update inside backward does not leave a place for."""
        raise TypeError("update_in_backward needs an npcpu Optimizer (SGD, Adam, AdamW), "
                        "got Lookahead")

    def evaluation_weights(self):
        return self.slow_weights_swapped()

    def describe(self) -> str:
        return f"Lookahead({self.optimizer.describe()})"

    def step(self) -> None:
        self.optimizer.step()
        self.step_count += 1
        if self.step_count % self.k == 0:
            self._sync()

    def _sync(self) -> None:
        """The slow and fast weights of every unfrozen parameter; within a step shared among
        processes (the inner optimizer's `share`), of this process's range of each (the update
        is elementwise, its rounding bits keyed by element: the same bits)."""
        inner = self.optimizer
        sync_number = self.step_count // self.k
        random = random_scratch()
        for index, p in inner.indexed_params():
            span = (0, p.size) if inner.share is None else inner.share.range_of(p)
            if p.frozen or span is None:
                continue
            first, stop = span
            fast, slow = inner.weights_of(p), self.slow_weights[index]
            stream = np.uint64((1 << 63) | (sync_number << 32) | index)
            rounding = Rounding(stochastic=inner.stochastic_rounding and fast.dtype == bfloat16,
                                seed=np.uint64(inner.seed), stream=stream, first=np.uint64(first),
                                random=random)
            kernels.lookahead_sync(flat(fast)[first:stop], flat(slow)[first:stop],
                                   slow.dtype.type(self.alpha), rounding)
            inner.publish_master(p, first, stop)

    @contextmanager
    def slow_weights_swapped(self):
        """Within the block the parameters hold the slow weights (e.g. to evaluate on them);
        afterwards they hold their own values again, bit for bit. Master copies are not touched."""
        saved = []
        for index, p in self.optimizer.indexed_params():
            saved.append((p, p.data.copy()))
            p.data[...] = to_storage(self.slow_weights[index], p.data.dtype)
        try:
            yield self
        finally:
            for p, data in saved:
                p.data[...] = data

    def state_dict(self) -> dict:
        """{"optimizer": inner state dict, "slow_weights": {index: ndarray}, "step_count", "k", "alpha"}."""
        return {"optimizer": self.optimizer.state_dict(),
                "slow_weights": {i: w.copy() for i, w in self.slow_weights.items()},
                "step_count": self.step_count, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` after checking it whole (slow-weight indices, shapes and dtypes must
        match; nothing is cast); a ValueError names the field and leaves everything unchanged."""
        owner = "Lookahead.load_state_dict"
        for key in ("optimizer", "slow_weights", "step_count", "k", "alpha"):
            if key not in state_dict:
                raise ValueError(f"{owner}: missing field {key!r}")
        k = check_int(owner, "k", state_dict["k"], 1)
        alpha = check_real(owner, "alpha", state_dict["alpha"], low=0.0, low_open=True, high=1.0)
        step_count = check_int(owner, "step_count", state_dict["step_count"], 0)
        saved = state_dict["slow_weights"]
        if set(saved) != set(self.slow_weights):
            raise ValueError(f"{owner}: slow_weights: expected indices {sorted(self.slow_weights)}, "
                             f"got {sorted(saved)}")
        for index, own in self.slow_weights.items():
            array = saved[index]
            if not isinstance(array, np.ndarray) or array.shape != own.shape or array.dtype != own.dtype:
                got = (array.shape, array.dtype) if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"{owner}: slow_weights[{index}]: expected shape {own.shape} and dtype "
                                 f"{own.dtype}, got {got}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.slow_weights = {i: np.array(saved[i], copy=True, order="C") for i in self.slow_weights}
        self.k, self.alpha, self.step_count = k, alpha, int(step_count)

