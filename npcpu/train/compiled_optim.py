"""What CompiledClassifierStep (npcpu.train.compiled) takes from the optimizer: each parameter's
settings and state arrays in the kernels' order, and Adam's bias corrections per step; and what
the compiled path supports, for its errors."""

from __future__ import annotations

import numpy as np

from npcpu.optim.adam import Adam, bias_corrections

SUPPORTED = ("a Sequential of Linear/FusedLinearReLU layers (a Linear may be followed by ReLU, "
             "GELU or Tanh) with trainable fp32 parameters, CrossEntropyLoss(reduction='mean', "
             "label_smoothing=0) and SGD, Adam or AdamW (amsgrad=False) with state_dtype='fp32'")


def unsupported(what: str) -> ValueError:
    return ValueError(f"CompiledClassifierStep: {what}; supported: {SUPPORTED}")


def optimizer_settings(optimizer, layers: list) -> dict:
    """Tuples of the layers' arrays, the optimizer's per-parameter settings and its state
    (created or completed as the optimizer's step would: zero moments, "step" counted after
    the run), in the kernels' parameter order (weight of layer l = 2 l, its bias 2 l + 1)."""
    adam = isinstance(optimizer, Adam)
    group_of = {id(p): k for k, group in enumerate(optimizer.param_groups)
                for p in group["params"]}
    empty = np.empty(0, dtype=layers[0].weight.data.dtype)
    weights, biases, first, second, hyper, flags, group_index, steps_taken = \
        [], [], [], [], [], [], [], set()
    for layer in layers:
        weights.append(layer.weight.data)
        biases.append(layer.bias.data if layer.bias is not None else empty)
        for p in (layer.weight, layer.bias):
            if p is None:  # an empty parameter: never updated
                first.append(empty)
                second.append(empty)
                hyper.append((0.0, 0.0, 0.0, 0.0))
                flags.append((False, False))
                group_index.append(0)
                continue
            group_index.append(group_of[id(p)])
            group = optimizer.param_groups[group_index[-1]]
            index = optimizer.index_of(p)
            if adam:
                if index not in optimizer.state:
                    optimizer.state[index] = optimizer.initial_state(p)
                state = optimizer.state[index]
                first.append(state["exp_avg"].reshape(-1))
                second.append(state["exp_avg_sq"].reshape(-1))
                hyper.append((*group["betas"], group["eps"], group["weight_decay"]))
                flags.append((optimizer.decoupled_weight_decay, group["maximize"]))
            else:
                state = optimizer.state.setdefault(index, {"step": 0})
                if group["momentum"] != 0:
                    buffer = state.setdefault("momentum_buffer", np.zeros_like(p.data))
                    first.append(buffer.reshape(-1))
                else:
                    first.append(empty)
                second.append(empty)
                hyper.append((group["lr"], group["momentum"], group["dampening"],
                              group["weight_decay"]))
                flags.append((group["nesterov"], group["maximize"]))
            steps_taken.add(state["step"])
    kind = type(optimizer).__name__
    if len(steps_taken) != 1:
        raise unsupported(f"the parameters have taken different numbers of {kind} steps "
                           f"{sorted(steps_taken)}")
    return dict(weights=tuple(weights), biases=tuple(biases), first_moments=tuple(first),
                second_moments=tuple(second), hyper=np.array(hyper, dtype=np.float64),
                flags=np.array(flags, dtype=np.bool_), group_index=group_index, adam=adam,
                steps_taken=steps_taken.pop())

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
