"""Optimizer: the torch-shaped base of npcpu's optimizers (param_groups, state, state_dict, step).

A subclass says which per-parameter arrays it keeps (`_moment_names`), how it checks a group's
hyperparameters (`_check_group`) and how it updates one tensor (`_update`, one fused kernel call).
Everything else lives here: parameter groups, skipping frozen parameters and those without a
gradient, bf16 optimizer states, fp32 master copies of 16-bit parameters, and state dicts.

Storage of parameters and states
--------------------------------
- float32 / float64 parameters are updated in place; with `state_dtype="fp32"` the moments have the
  parameter's own dtype (float64 moments for float64 parameters, as torch does).
- `state_dtype="bf16"` stores the moments as bfloat16 (half the memory and traffic of float32).
  They are rounded stochastically (with `stochastic_rounding=True`, the default): rounding to nearest
  would freeze a second moment v = beta2 v + (1 - beta2) g^2 with beta2 = 0.999 as soon as the change
  (1 - beta2)(v - g^2) falls below half a bf16 ulp (v / 512), that is whenever g^2 > 0.5 v: v could
  never decay. Stochastic rounding moves it by the right amount on average.
- bfloat16 parameters are updated in place with stochastic rounding by default, or, with
  `master_weights=True`, through a float32 copy kept in the state ("master_param") and rounded to
  nearest into the parameter after each step.
- float16 parameters always use a float32 master copy: float16 keeps 10 mantissa bits but only 5
  exponent bits, so small weights fall into its subnormal range where updates are lost whatever the
  rounding; an fp32 master is the standard mixed-precision recipe (Micikevicius et al., 2018).

Stochastic rounding draws from npcpu.kernels.rng with the optimizer's `seed` and a stream made of
(the parameter's step count, its index), so a run reloaded from a state dict (which holds both)
continues bit for bit.

Updating inside backward
------------------------
`fuse_into_backward()` makes each parameter's layer hand its gradient to the optimizer as soon as
it is complete, during the backward pass (`Parameter.updater`: the optimizer implements
npcpu.nn.parameter.InBackwardUpdater, all that nn/ knows of it); `step()` is then not called. A
Linear layer does it a block of weight rows at a time (npcpu.nn.weight_blocks), so the model never
holds its whole gradient: for mlp52m in bf16 that is 216 MB of float32 gradients not allocated.
Both paths run the same code: `begin_update(p)` counts the step (`_count_step`) and returns a
function that updates a contiguous range of p's elements (`_update`); `step()` counts and updates
each whole tensor directly (no function made per parameter and step, which small models notice),
through the parameter's TensorStep of its last step where nothing has changed
(npcpu.optim.parameter_storage).
For the elementwise optimizers (SGD, Adam, AdamW) the result does not depend on how the elements
are split (the stochastic-rounding bits included); LAMB's trust ratio needs the norm of the whole
update, so LAMB cannot be fused.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import numpy as np

from npcpu.checks import check_flag, check_int, check_real
from npcpu.kernels.optim_io import ELEMENTS_PER_HASH
from npcpu.nn.parameter import Parameter
from npcpu.optim.optimizer_state import checked_state
from npcpu.optim.parameter_storage import ParameterStorage, TensorStep, flat

STATE_DTYPES = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# hyperparameter checks shared by the optimizers
# ---------------------------------------------------------------------------------------------
def check_betas(owner: str, betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    return tuple(check_real(owner, f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
                 for i, b in enumerate(betas))


class Optimizer(ParameterStorage):
    """Base class: parameter groups, per-parameter state, state dicts and the step loop.

    Parameters
    ----------
    params : iterable of Parameter, or of dicts {"params": [...], <hyperparameter>: value}
        As in torch: each dict is a parameter group whose missing hyperparameters take `defaults`.
    defaults : dict
        The hyperparameters of the subclass ("lr", ...).
    state_dtype : {"fp32", "bf16"}
        Storage of the moments (see the module docstring).
    master_weights : bool
        Keep a float32 master copy of bfloat16 parameters (float16 ones always have one).
    stochastic_rounding : bool
        Round into bfloat16 (states and parameters) stochastically; False: to nearest even.
    seed : int
        Seed of the stochastic rounding.

    Attributes
    ----------
    elementwise : bool (class attribute)
        True when the update of each element depends only on that element's gradient and state,
        so that a tensor can be updated a range of elements at a time (fuse_into_backward).
    element_alignment : int (class attribute)
        Ranges handed to `begin_update`'s function start at a multiple of this (the stochastic
        rounding draws one hash per that many elements); with `begin_update`, the
        npcpu.nn.parameter.InBackwardUpdater protocol that layers call inside backward.
    fused_into_backward : bool
        Set by `fuse_into_backward()`.
    param_groups : list of dict
        Each with "params" (a list of Parameter) and the hyperparameters; schedules write "lr" here.
    state : dict of int to dict
        Per-parameter state by the parameter's index (its position over all groups, as in torch's
        state dicts): "step" (int) and the arrays of the subclass, created at its first update.
    share : None, or this process's share of a step shared among processes
        Set by npcpu.dist.shard.OptimizerShard around a step: `step()` then updates only the
        elements `share.range_of(p)` -> (first, stop) of each parameter (None: none of it), as
        the whole tensor's update would update them; sums over a whole tensor that is split
        between processes (LAMB's norms) come from `share.fold_partial_sums`.
    """

    share = None

    elementwise = True
    element_alignment = ELEMENTS_PER_HASH

    def __init__(self, params, defaults: dict, *, state_dtype: str = "fp32",
                 master_weights: bool = False, stochastic_rounding: bool = True, seed: int = 0):
        owner = type(self).__name__
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"{owner}: state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
        self.seed = check_int(owner, "seed", seed, 0)
        self.state_dtype = state_dtype
        self.master_weights = check_flag(owner, "master_weights", master_weights)
        self.stochastic_rounding = check_flag(owner, "stochastic_rounding", stochastic_rounding)
        self.defaults = dict(defaults)
        self._check_group(dict(self.defaults))
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        self._params: list[Parameter] = []
        self._index: dict[int, int] = {}  # id(Parameter) -> index
        self._group_index: dict[int, int] = {}  # id(Parameter) -> position of its group
        self.fused_into_backward = False
        self._random = None  # the kernels' random scratch (random_scratch), made at the first step
        self._tensor_steps: dict[int, TensorStep] = {}  # by parameter index: see step()

        if isinstance(params, (Parameter, np.ndarray, dict)):
            raise TypeError(f"{owner}: params must be an iterable of Parameters or of dicts, got a "
                            f"single {type(params).__name__}")
        groups = list(params)
        if not groups:
            raise ValueError(f"{owner}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # -- what a subclass provides ----------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        """Raise ValueError/TypeError naming the field when a hyperparameter is out of range."""
        raise NotImplementedError

    def _moment_names(self, group: dict) -> tuple[str, ...]:
        """The names of the per-parameter arrays this optimizer keeps under `group`'s settings."""
        raise NotImplementedError

    def _update(self, weights, grad, state: dict, group: dict, rounding: tuple) -> None:
        """Update flat `weights` in place from flat `grad` (state["step"] already counts this step).

        `rounding` is the kernels' npcpu.kernels.optim_io.Rounding (stochastic, seed, stream,
        first element, random scratch), passed on to the kernel as it is.
        """
        raise NotImplementedError

    # -- groups and parameters -------------------------------------------------------------------
    def add_param_group(self, group: dict) -> None:
        owner = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{owner}: a parameter group must be a dict with a 'params' entry, "
                            f"got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Parameter) else list(params)
        if not params:
            raise ValueError(f"{owner}: parameter group {len(self.param_groups)} has an empty "
                             "parameter list")
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"{owner}: params must be npcpu Parameters, got {type(p).__name__}")
            if id(p) in self._index:
                raise ValueError(f"{owner}: {p!r} appears in more than one place in the parameter "
                                 "groups")
        full = {**self.defaults, **group, "params": params}
        self._check_group(full)
        for p in params:
            self._index[id(p)] = len(self._params)
            self._group_index[id(p)] = len(self.param_groups)
            self._params.append(p)
            if self.fused_into_backward:
                self._fuse(p)
        self.param_groups.append(full)

    def indexed_params(self):
        """(index, Parameter) over all groups, in state-dict order."""
        return enumerate(self._params)

    def index_of(self, p: Parameter) -> int:
        return self._index[id(p)]

    def zero_grad(self) -> None:
        for p in self._params:
            p.zero_grad()

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> None:
        """Update every parameter that is not frozen and has a gradient; the others are untouched
        (no state created, no step counted, no decay)."""
        if self.fused_into_backward:
            raise RuntimeError(f"{type(self).__name__}: the parameters are updated inside backward "
                               "(fuse_into_backward was called); step() must not be called")
        if self.share is not None:
            self._step_share()
            return
        for index, p in enumerate(self._params):
            grad = None if p.frozen else p.grad
            if grad is None:  # not updated: keep none of its arrays alive
                self._tensor_steps.pop(index, None)
                continue
            tensor = self._tensor_step(index, p, grad)  # the checks, where anything changed
            rounding = tensor.rounding or self._rounding(tensor.state, index, 0)
            self._update(tensor.flat_weights, tensor.flat_grad, tensor.state, tensor.group,
                         rounding)
            if not tensor.in_place:
                self._updated(p, tensor.weights, 0, p.size)

    def begin_update(self, p: Parameter):
        """Count one step of `p` (creating its state at the first) and return `update(grad, first=0)`,
        which updates p's elements first .. first + grad.size - 1 (in C order) from `grad`, their
        gradient (flat, in p's compute dtype). `first` must be a multiple of `element_alignment`.
        Call it once with the whole gradient, or once per disjoint range until every element is
        updated (elementwise optimizers only): both give the same result, bit for bit; `step()`
        is the first way."""
        owner = type(self).__name__
        index, group, state, weights = self._count_step(p)
        arrays = {name: flat(a) for name, a in state.items() if isinstance(a, np.ndarray)}

        def update(grad: np.ndarray, first: int = 0) -> None:
            stop, alignment = first + grad.size, self.element_alignment
            if first % alignment or stop > p.size or (not self.elementwise and grad.size != p.size):
                raise ValueError(f"{owner}: cannot update elements {first}..{stop - 1} of {p!r}: "
                                 f"ranges must start at a multiple of {alignment} and lie inside the "
                                 "parameter" + ("" if self.elementwise else
                                                f", and {owner} updates whole tensors only"))
            part = {**state, **{name: a[first:stop] for name, a in arrays.items()}}
            self._update(flat(weights)[first:stop], grad, part, group,
                         self._rounding(state, index, first))
            self._updated(p, weights, first, stop)
        return update

    def _step_share(self) -> None:
        """step() on this process's `share`: each parameter's range updated as the whole
        tensor's update would update it (an elementwise rule: the same bits)."""
        for p in self._params:
            span = self.share.range_of(p)
            if span is not None and not p.frozen and p.grad is not None:
                first, stop = span
                self.begin_update(p)(flat(self._checked_grad(p))[first:stop], first)

    # -- updates inside backward -----------------------------------------------------------------
    def fuse_into_backward(self) -> None:
        """Update each parameter during the backward pass, as soon as its gradient is complete,
        instead of in `step()` (which then raises).

        Whole-model gradients are never held: a Linear layer computes dL/dW a block of rows at a
        time and hands each block here at once (npcpu.nn.weight_blocks); other layers hand over
        their (small) gradients at the end of their backward. Every parameter's gradient is
        dropped after its update, so gradient clipping, gradient accumulation, loss scaling and
        anything else that reads gradients after backward cannot be combined with this. A
        parameter used by several layers (a tied weight) must say how many
        (`Parameter.uses_per_backward`): it is then updated once, by its last use. Elementwise
        optimizers only (SGD, Adam, AdamW): LAMB needs the whole update's norm first.
        """
        owner = type(self).__name__
        if not self.elementwise:
            raise ValueError(f"{owner}: cannot update inside backward: its update of a tensor "
                             "depends on the whole tensor (a norm), not on each element alone")
        for p in self._params:
            if p.updater is not None and p.updater is not self:
                raise ValueError(f"{owner}: {p!r} is already updated inside backward by another "
                                 "optimizer")
        self.fused_into_backward = True
        for p in self._params:
            self._fuse(p)

    def _fuse(self, p: Parameter) -> None:
        p.updater = self
        p.grad = None  # a gradient accumulated before fusing would never be used

    # -- what the Trainer calls besides step (TrainerOptimizer) -----------------------------------
    def evaluation_weights(self) -> ContextManager:
        """The parameters are the weights to evaluate: nothing to swap."""
        return contextlib.nullcontext(self)

    def describe(self) -> str:
        return type(self).__name__

    # -- state dicts -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot in torch's layout, arrays copied (NumPy; bf16 states stay bf16).

        {"state": {index: {"step": int, <array name>: ndarray}},
         "param_groups": [{<hyperparameters>, "params": [indices]}],
         "seed": int, "state_dtype": str}
        """
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [self._index[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {index: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                 for index, s in self.state.items()}
        return {"state": state, "param_groups": groups, "seed": self.seed,
                "state_dtype": self.state_dtype}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` (copying its arrays), after checking all of it.

        Group and parameter counts, hyperparameters, state names, shapes and dtypes must match
        what this optimizer would create; nothing is ever cast. A ValueError names the first field
        that does not, and leaves the optimizer unchanged.
        """
        new_groups, new_state, seed = checked_state(self, state_dict)
        for own, merged in zip(self.param_groups, new_groups):
            own.update(merged)
        self.state = new_state
        self.seed = seed
        for p in self._params:
            self.publish_master(p)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            settings = ", ".join(f"{k}={v!r}" for k, v in group.items() if k != "params")
            lines.append(f"  group {i}: {len(group['params'])} params, {settings}")
        return "\n".join(lines + [")"])
