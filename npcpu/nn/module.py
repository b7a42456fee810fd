"""Module and Sequential: the autograd-free layer contract.

A layer's `forward(x)` returns its output and keeps on the layer exactly what its `backward` needs;
`backward(dy)` ADDS dL/dparam into each `Parameter.grad` and returns dL/dx when the layer's
`input_requires_grad` is True, else None (and then computes no dL/dx at all).

Input gradients, as in torch: a model or layer called directly computes no gradient for its input
(`input_requires_grad` is False by default), since the data needs none and dL/dx of a first
Linear layer is a whole GEMM. Ask for it with ``module.input_requires_grad = True`` (gradient
checks, a model whose input is another model's output). Inside a `Sequential` the children are
routed: a layer gets True when a trainable layer sits below it or the Sequential's own input
needs a gradient.

Nothing here knows about optimizers: they meet the model only at `Parameter` (also when an
optimizer updates inside backward: a layer hands its finished gradients to the parameter's
`InBackwardUpdater`, see npcpu.nn.parameter and `update_parameters_in_backward`).

Names and `state_dict()` keys follow PyTorch ("0.weight", "0.bias", ...), so a state dict moves
between an npcpu model and the equivalent torch module unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

from npcpu.dtypes import bfloat16
from npcpu.nn.parameter import Parameter
from npcpu.precision import (check_precision, compute_dtype, storage_dtype, to_compute,
                             to_storage)


class Module:
    """Base class of every layer and model.

    Attributes
    ----------
    training : bool
        Train mode (dropout active, caches kept) or eval mode (`eval()`: no caches are kept).
    input_requires_grad : bool
        Whether `backward` computes and returns dL/dx (else it returns None). False by default, as
        a torch input that does not ask for a gradient gets none; set it True to get dL/dx of a
        layer or model used alone. A `Sequential` sets it for its children from its own value and
        from which layers below are trainable (False for everything up to a frozen prefix).
    precision : str
        "fp32", "bf16", "fp16" or "fp64": storage of parameters and of the activations kept for
        backward (see npcpu.precision). Set with `set_precision`.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        self.training = True
        self.input_requires_grad = False
        self.precision = "fp32"

    # -- registration (attribute assignment, as in torch) ---------------------------------------
    def __setattr__(self, name, value):
        if isinstance(value, (Parameter, Module)):  # one test for the caches set on every call
            if isinstance(value, Parameter):
                self._parameters[name] = value
            else:
                self._modules[name] = value
        object.__setattr__(self, name, value)

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def skip_backward(self) -> None:
        """Called instead of `backward` when nothing needs this layer's gradients (a frozen prefix):
        drops the cache and records the skipped work (see npcpu.nn.work)."""
        for child in self.children():
            child.skip_backward()

    # -- helpers for layers ---------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, precision: str) -> None:
        # the two dtypes are read on every forward and backward: looked up here, once
        object.__setattr__(self, "_dtypes", (compute_dtype(precision), storage_dtype(precision)))
        object.__setattr__(self, "_precision", precision)

    @property
    def compute_dtype(self) -> np.dtype:
        return self._dtypes[0]

    @property
    def storage_dtype(self) -> np.dtype:
        return self._dtypes[1]

    @property
    def trainable(self) -> bool:
        """True when any parameter of this module (or below it) is not frozen."""
        return any(not p.frozen for p in self.parameters())

    def check_input(self, x, *, features: int | None = None, min_ndim: int = 1) -> np.ndarray:
        """Validate a floating input and return it in the compute dtype.

        Raises ValueError (wrong shape) or TypeError (not floating point, not an array) naming the
        layer, what it expected and what it received.
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{self!r}: expected a NumPy array, got {type(x).__name__}")
        if x.dtype.kind != "f" and x.dtype != bfloat16:
            raise TypeError(f"{self!r}: expected a floating-point input, got dtype {x.dtype}")
        if x.ndim < min_ndim:
            raise ValueError(f"{self!r}: expected an input with at least {min_ndim} dimension(s), "
                             f"got shape {x.shape}")
        if features is not None and x.shape[-1] != features:
            raise ValueError(f"{self!r}: expected input of shape (..., {features}), got {x.shape}")
        return np.ascontiguousarray(to_compute(x, self._dtypes[0]))

    def check_grad_output(self, dy, expected_shape: tuple) -> np.ndarray:
        """Validate the upstream gradient against the shape `forward` returned."""
        if not isinstance(dy, np.ndarray) or dy.shape != tuple(expected_shape):
            got = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(f"{self!r}: backward expected a gradient of shape {tuple(expected_shape)},"
                             f" got {got}")
        return np.ascontiguousarray(to_compute(dy, self._dtypes[0]))

    def update_parameters_in_backward(self) -> None:
        """Hand this layer's own parameters to their updater when it updates inside backward
        (`Parameter.update_in_backward`: only at a parameter's last use in the pass); nothing
        otherwise. Layers call it once as their backward ends, when they no longer read their
        parameters (each call counts one use of each parameter)."""
        for p in self._parameters.values():
            p.update_in_backward()

    def missing_forward(self) -> RuntimeError:
        """The error for backward() without a preceding forward() in train mode."""
        return RuntimeError(f"{self!r}: backward() called before forward() (or after a forward() in "
                            "eval mode, which keeps nothing for backward)")

    # -- traversal ------------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs. A Parameter shared by two layers (a tied weight) is
        listed once, under its first name, unless `remove_duplicate` is False (as in torch)."""
        seen = set()
        for name, p in self._named_parameters_all(prefix):
            if remove_duplicate:
                if id(p) in seen:
                    continue
                seen.add(id(p))
            yield name, p

    def _named_parameters_all(self, prefix: str) -> Iterator[tuple[str, Parameter]]:
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p
        for name, child in self._modules.items():
            yield from child._named_parameters_all(f"{prefix}.{name}" if prefix else name)

    def parameters(self) -> list[Parameter]:
        """All parameters, each once (as torch's: a weight tied between two layers is listed under
        its first name), each named with its dotted state-dict key (set here). `named_parameters`
        and `state_dict` list a tied weight under every name, as torch's state_dict does."""
        params = {}
        for name, p in self.named_parameters():
            if id(p) not in params:
                p.name = name
                params[id(p)] = p
        return list(params.values())

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- modes and bookkeeping ------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def freeze(self) -> Module:
        for p in self.parameters():
            p.frozen = True
        return self

    def unfreeze(self) -> Module:
        for p in self.parameters():
            p.frozen = False
        return self

    def set_precision(self, precision: str) -> Module:
        """Store parameters (and saved activations) as `precision` dictates, rounding to nearest even."""
        check_precision(precision)
        for m in self.modules():
            m.precision = precision
        dtype = storage_dtype(precision)
        for p in self.parameters():
            p.data = np.ascontiguousarray(to_storage(p.values(), dtype))
            p.grad = None
        return self

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """Non-parameter state a checkpoint must keep (JSON values), e.g. Dropout's call counter."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self!r}: unexpected extra state {sorted(state)}")

    def state_dict(self, remove_duplicate: bool = False) -> OrderedDict:
        """Parameter arrays under PyTorch's keys: a tied Parameter under each of its names, as in
        torch, or (`remove_duplicate`, for checkpoints) once, under its first name, which
        `load_state_dict` accepts too. The arrays are the parameters' own (not copies)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters(
            remove_duplicate=remove_duplicate))

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, converting to each parameter's storage dtype.

        Names and shapes are checked first, all together, so a bad state dict changes nothing.
        Accepts NumPy arrays or anything `np.asarray` takes (a CPU torch tensor included).
        """
        own = dict(self.named_parameters(remove_duplicate=False))
        problems = []
        if strict:
            provided = {id(own[name]) for name in state if name in own}  # a tied one: either name
            missing = sorted(name for name, p in own.items()
                             if name not in state and id(p) not in provided)
            unexpected = sorted(set(state) - set(own))
            if missing:
                problems.append(f"missing keys {missing}")
            if unexpected:
                problems.append(f"unexpected keys {unexpected}")
        arrays = {}
        for name, value in state.items():
            if name not in own:
                continue
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            if array.shape != own[name].shape:
                problems.append(f"{name!r}: expected shape {own[name].shape}, got {array.shape}")
            elif array.dtype.kind != "f" and array.dtype != storage_dtype("bf16"):
                problems.append(f"{name!r}: expected a floating-point array, got dtype {array.dtype}")
            arrays[name] = array
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        for name, array in arrays.items():
            p = own[name]
            p.data = np.ascontiguousarray(to_storage(np.asarray(array), p.data.dtype)).copy()

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse and stops where no gradient is needed.

    Child i needs dL/d(its input) only when something below it is trainable or when the
    Sequential's own input needs a gradient. So a frozen prefix (layers 0..k all frozen) makes the
    backward pass stop after layer k+1, and layer k+1 skips its dx GEMM.
    """

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is not a Module, got {type(layer).__name__}")
            setattr(self, str(i), layer)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def _route_input_grads(self) -> None:
        needs = self.input_requires_grad
        for layer in self:
            layer.input_requires_grad = needs
            needs = needs or layer.trainable

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._route_input_grads()
        for layer in self:
            x = layer.forward(x)
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        layers = list(self)
        for i in reversed(range(len(layers))):
            layer = layers[i]
            if not layer.trainable and not layer.input_requires_grad:
                return _skip_backward(layers[:i + 1])  # a frozen prefix: nothing here needs a gradient
            dy = layer.backward(dy)
            if not layer.input_requires_grad:
                return _skip_backward(layers[:i])  # everything below is frozen
        return dy


def _skip_backward(layers: list[Module]) -> None:
    for layer in layers:
        layer.skip_backward()
    return None


class ModuleDict(Module):
    """Named submodules, registered in the given order (torch.nn.ModuleDict): a namespace that
    gives its children dotted state-dict keys ("transformer.wte.weight"); it has no forward."""

    def __init__(self, modules: dict[str, Module]):
        super().__init__()
        for name, module in modules.items():
            if not isinstance(module, Module):
                raise TypeError(f"ModuleDict: {name!r} is not a Module, got {type(module).__name__}")
            setattr(self, name, module)

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]
