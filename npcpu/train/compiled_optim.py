"""What CompiledClassifierStep (npcpu.train.compiled) takes from the optimizer: each parameter's
settings and state arrays in the kernels' order, and Adam's bias corrections per step; and what
the compiled path supports, for its errors."""

from __future__ import annotations

import numpy as np

from npcpu.dtypes import bfloat16
from npcpu.kernels.compiled_update import KEEP, NEAREST, STOCHASTIC
from npcpu.optim.adam import Adam, bias_corrections

SUPPORTED = ("a Sequential of Linear/FusedLinearReLU layers (a Linear may be followed by ReLU, "
             "GELU or Tanh) with trainable fp32 parameters, or bf16 ones where bf16 GEMMs run "
             "natively, CrossEntropyLoss(reduction='mean', label_smoothing=0) and SGD, Adam or "
             "AdamW (amsgrad=False) with state_dtype='fp32'")


def unsupported(what: str) -> ValueError:
    return ValueError(f"CompiledClassifierStep: {what}; supported: {SUPPORTED}")


def optimizer_settings(optimizer, layers: list) -> dict:
    """Tuples of the layers' arrays, the optimizer's per-parameter settings and its state
    (created or completed as the optimizer's step would: zero moments, the fp32 master copy,
    "step" counted after the run), in the kernels' parameter order (weight of layer l = 2 l, its
    bias 2 l + 1); and how each parameter stores its update (npcpu.kernels.compiled_update:
    storage, masters, tensor_index, seed). The weights and biases are the parameters' own arrays
    (bfloat16 ones too); every other array is in the compute dtype."""
    adam = isinstance(optimizer, Adam)
    group_of = {id(p): k for k, group in enumerate(optimizer.param_groups)
                for p in group["params"]}
    empty = np.empty(0, dtype=layers[0].weight.data.dtype)
    none = np.empty(0, dtype=layers[0].weight.compute_dtype)  # an absent state array
    weights, biases, first, second, hyper, flags, group_index, steps_taken = \
        [], [], [], [], [], [], [], set()
    storage, masters, tensor_index = [], [], []
    for layer in layers:
        weights.append(layer.weight.data)
        biases.append(layer.bias.data if layer.bias is not None else empty)
        for p in (layer.weight, layer.bias):
            if p is None:  # an empty parameter: never updated
                first.append(none)
                second.append(none)
                hyper.append((0.0, 0.0, 0.0, 0.0))
                flags.append((False, False))
                group_index.append(0)
                storage.append(KEEP)
                masters.append(none)
                tensor_index.append(0)
                continue
            group_index.append(group_of[id(p)])
            group = optimizer.param_groups[group_index[-1]]
            index = optimizer.index_of(p)
            if index not in optimizer.state:
                optimizer.state[index] = optimizer.initial_state(p)
            state = optimizer.state[index]
            if adam:
                first.append(state["exp_avg"].reshape(-1))
                second.append(state["exp_avg_sq"].reshape(-1))
                hyper.append((*group["betas"], group["eps"], group["weight_decay"]))
                flags.append((optimizer.decoupled_weight_decay, group["maximize"]))
            else:
                if group["momentum"] != 0:  # switched on mid-run: made as SGD's step makes it
                    buffer = state.setdefault("momentum_buffer",
                                              np.zeros(p.shape, dtype=p.compute_dtype))
                    first.append(buffer.reshape(-1))
                else:
                    first.append(none)
                second.append(none)
                hyper.append((group["lr"], group["momentum"], group["dampening"],
                              group["weight_decay"]))
                flags.append((group["nesterov"], group["maximize"]))
            steps_taken.add(state["step"])
            master = state.get("master_param")
            masters.append(none if master is None else master.reshape(-1))
            storage.append(KEEP if p.data.dtype != bfloat16 else NEAREST if master is not None
                           or not optimizer.stochastic_rounding else STOCHASTIC)
            tensor_index.append(index)
    kind = type(optimizer).__name__
    if len(steps_taken) != 1:
        raise unsupported(f"the parameters have taken different numbers of {kind} steps "
                           f"{sorted(steps_taken)}")
    return dict(weights=tuple(weights), biases=tuple(biases), first_moments=tuple(first),
                second_moments=tuple(second), hyper=np.array(hyper, dtype=np.float64),
                flags=np.array(flags, dtype=np.bool_), group_index=group_index, adam=adam,
                steps_taken=steps_taken.pop(), storage=np.array(storage, dtype=np.int64),
                masters=tuple(masters), tensor_index=np.array(tensor_index, dtype=np.int64),
                seed=np.uint64(optimizer.seed))


def corrections_per_step(optimizer, steps: int, steps_taken: int, group_index: list
                         ) -> np.ndarray:
    """(steps, P, 2) float64: Adam's (1 - beta1^t, sqrt(1 - beta2^t)) of each parameter's
    group at the steps t = steps_taken + 1, ... (npcpu.optim.adam.bias_corrections, as Adam
    itself takes them; zeros for SGD, which does not read them)."""
    corrections = np.zeros((steps, len(group_index), 2))
    if not isinstance(optimizer, Adam):
        return corrections
    groups = optimizer.param_groups
    for k, group in enumerate(groups):
        per_step = [bias_corrections(group["betas"], t)
                    for t in range(steps_taken + 1, steps_taken + steps + 1)]
        corrections[:, [p for p, g in enumerate(group_index) if g == k]] = \
            np.array(per_step)[:, None, :]
    return corrections
