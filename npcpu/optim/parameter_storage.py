"""How an optimizer keeps one parameter: its state arrays, its float32 master copy, and the
bookkeeping of one tensor's step (counting it, checking its gradient, the kernels' Rounding).

`ParameterStorage` is a base of npcpu.optim.Optimizer (see its docstring for the storage rules);
it reads the optimizer's `state`, `param_groups`, `state_dtype`, `master_weights`, `seed`,
`stochastic_rounding` and its subclass's `_moment_names`, and keeps `_tensor_steps` and `_random`.

A small model's step is a few microseconds of kernel per tensor, so what `step()` does around the
kernel shows. `TensorStep` keeps what one parameter's update takes from one step to the next: the
checked gradient and the array the update goes into, as the flat views the kernels take. It is
made where every check runs, and reused only while the objects it was made from are the very same
(the parameter's data array, its gradient accumulator, its state dict and state names) with the
gradient's shape and dtype unchanged: a gradient replaced by another array, a state dict loaded or
a momentum switched on makes a new one, after the same checks.
"""

from __future__ import annotations

import numpy as np

from npcpu.kernels.optim_io import Rounding, random_scratch
from npcpu.nn.parameter import Parameter
from npcpu.optim.storage_checks import check_storable, check_updated_in_place
from npcpu.precision import bfloat16, to_storage


def flat(array: np.ndarray) -> np.ndarray:
    """A flat view for the kernels: bfloat16 as its uint16 bits. Never a copy."""
    if not array.flags.c_contiguous:
        raise ValueError(f"optimizer: arrays must be C-contiguous to be updated in place, "
                         f"got one of shape {array.shape} with strides {array.strides}")
    view = array.reshape(-1)
    return view.view(np.uint16) if view.dtype == bfloat16 else view


class TensorStep:
    """One parameter's update in `Optimizer.step`, reusable at its next step while `fits` says so.

    Attributes: `flat_grad` and `flat_weights` (the kernels' views of the gradient and of the array
    the update goes into: p.data or the master copy), `state` and `group` (the parameter's),
    `rounding` (the kernels' Rounding when no array of the update is bf16, which is then never
    read and can serve every step; None: made per step), `in_place` (p.data itself is updated and
    is float32/float64: nothing to check or publish afterwards).
    """

    __slots__ = ("data", "grad", "shape", "dtype", "state", "group", "moments", "weights",
                 "flat_weights", "flat_grad", "rounding", "in_place")

    def __init__(self, p: Parameter, grad: np.ndarray, flat_grad: np.ndarray, state: dict,
                 group: dict, moments: tuple, weights: np.ndarray, rounding: Rounding):
        self.data, self.grad, self.shape, self.dtype = p.data, grad, grad.shape, grad.dtype
        self.state, self.group, self.moments, self.weights = state, group, moments, weights
        self.flat_weights, self.flat_grad = flat(weights), flat_grad
        arrays = [flat(a) for a in state.values() if isinstance(a, np.ndarray)]
        rounded = any(a.dtype == np.uint16 for a in [self.flat_weights, *arrays])  # bf16 bits
        self.rounding = None if rounded else rounding
        self.in_place = weights is p.data and weights.dtype in (np.float32, np.float64)

    def fits(self, p: Parameter, grad: np.ndarray, state: dict | None, moments: tuple) -> bool:
        """Whether this is still p's update: the same arrays and state, the same state names."""
        return (grad is self.grad and p.data is self.data and state is self.state
                and grad.shape == self.shape and grad.dtype == self.dtype
                and moments == self.moments)


class ParameterStorage:
    """The per-parameter half of Optimizer (state arrays, master copies, one tensor's step)."""

    # -- storage of one parameter ----------------------------------------------------------------
    def _state_dtype(self, p: Parameter) -> np.dtype:
        return bfloat16 if self.state_dtype == "bf16" else p.compute_dtype

    def _has_master(self, p: Parameter) -> bool:
        return p.data.dtype == np.float16 or (p.data.dtype == bfloat16 and self.master_weights)

    def _state_spec(self, p: Parameter, group: dict) -> dict[str, np.dtype]:
        """Array name -> dtype of the state this optimizer keeps for `p` (all of shape p.shape)."""
        spec = {name: self._state_dtype(p) for name in self._moment_names(group)}
        if self._has_master(p):
            spec["master_param"] = np.dtype(np.float32)
        return spec

    def initial_state(self, p: Parameter) -> dict:
        """The state `p` gets at its first step (step 0, zero moments, its master copy): for a
        process that holds another's state (npcpu.dist.shard)."""
        return self._init_state(p, self.param_groups[self._group_index[id(p)]])

    def _init_state(self, p: Parameter, group: dict) -> dict:
        state = {"step": 0}
        for name, dtype in self._state_spec(p, group).items():
            state[name] = np.zeros(p.shape, dtype=dtype)
        if "master_param" in state:
            state["master_param"][...] = p.values()
        return state

    def weights_of(self, p: Parameter) -> np.ndarray:
        """The array the updates go into: the float32 master copy when there is one, else p.data."""
        state = self.state.get(self._index[id(p)])
        return state["master_param"] if state is not None and "master_param" in state else p.data

    def publish_master(self, p: Parameter, first: int = 0, stop: int | None = None) -> None:
        """Round the master copy (if any) to nearest into the parameter's own storage (elements
        first .. stop - 1 in C order; all by default)."""
        weights = self.weights_of(p)
        if weights is not p.data:
            source = weights.reshape(-1)[first:stop]
            check_storable(type(self).__name__, p, source)
            target = p.data.reshape(-1)[first:stop]
            target[...] = to_storage(source, p.data.dtype)

    def param_values(self, p: Parameter) -> np.ndarray:
        """The parameter's values in its compute dtype, from the master copy when there is one."""
        weights = self.weights_of(p)
        return weights.copy() if weights is not p.data else np.array(p.values(), copy=True)

    # -- one tensor's step -----------------------------------------------------------------------
    def _checked_grad(self, p: Parameter) -> np.ndarray:
        grad = p.grad
        if not isinstance(grad, np.ndarray) or grad.shape != p.shape:
            got = grad.shape if isinstance(grad, np.ndarray) else type(grad).__name__
            raise ValueError(f"{type(self).__name__}: {p!r} has a gradient of shape {got}, "
                             f"expected {p.shape}")
        if grad.dtype != p.compute_dtype:
            raise TypeError(f"{type(self).__name__}: {p!r} has a {grad.dtype} gradient, expected "
                            f"{p.compute_dtype}")
        return np.ascontiguousarray(grad)

    def _count_step(self, p: Parameter) -> tuple[int, dict, dict, np.ndarray]:
        """Count one step of `p`, creating its state at the first (and any array an option switched
        on mid-run needs: momentum, amsgrad); return (its index, its group, its state, the array
        its updates go into)."""
        index = self._index[id(p)]
        group = self.param_groups[self._group_index[id(p)]]
        state = self.state.get(index)
        if state is None:
            state = self.state[index] = self._init_state(p, group)
        elif any(name not in state for name in self._moment_names(group)):
            for name, dtype in self._state_spec(p, group).items():
                if name not in state:
                    state[name] = np.zeros(p.shape, dtype=dtype)
        state["step"] += 1
        return index, group, state, state.get("master_param", p.data)

    def _tensor_step(self, index: int, p: Parameter, grad: np.ndarray) -> TensorStep:
        """Count one step of parameter `index` (p, with gradient `grad`, p.grad) and return its
        TensorStep: the one of its last step when that still fits, else a new one, made after
        `_checked_grad` and `_count_step` (kept for the next step when the gradient needed no
        copy to be contiguous)."""
        tensor = self._tensor_steps.get(index)
        if tensor is not None and tensor.fits(p, grad, self.state.get(index),
                                              self._moment_names(tensor.group)):
            tensor.state["step"] += 1
            return tensor
        flat_grad = flat(self._checked_grad(p))
        index, group, state, weights = self._count_step(p)
        tensor = TensorStep(p, grad, flat_grad, state, group, self._moment_names(group), weights,
                            self._rounding(state, index, 0))
        if np.shares_memory(flat_grad, grad):
            self._tensor_steps[index] = tensor
        else:
            self._tensor_steps.pop(index, None)
        return tensor

    def _rounding(self, state: dict, index: int, first: int) -> Rounding:
        """The kernels' Rounding for elements first.. of parameter `index` at this step. Only the
        bf16 arrays a kernel stores into are rounded, so `stochastic` is the optimizer's setting;
        the random scratch (for any thread count) is made once."""
        if self._random is None:
            self._random = random_scratch()
        return Rounding(self.stochastic_rounding, np.uint64(self.seed),  # by position: faster
                        np.uint64((state["step"] << 32) | index), np.uint64(first), self._random)

    def _updated(self, p: Parameter, weights: np.ndarray, first: int, stop: int) -> None:
        """After elements first .. stop - 1 of `weights` (p.data or p's master copy) changed:
        check that p.data stayed itself, or round the master copy into it."""
        if weights is p.data:
            check_updated_in_place(type(self).__name__, p, first, stop)
        else:
            self.publish_master(p, first, stop)
