"""The checking half of Optimizer.load_state_dict: a saved state dict against what the optimizer
would create (groups, hyperparameters, state names, shapes, dtypes), nothing cast."""

from __future__ import annotations

import numpy as np

from npcpu.checks import check_int


def checked_state(optimizer, state_dict: dict) -> tuple[list[dict], dict, int]:
    """(param groups, state, seed) for `optimizer` from `state_dict`, every array copied; a
    ValueError names the first field that does not match (and nothing has been changed)."""
    owner = f"{type(optimizer).__name__}.load_state_dict"
    for key in ("state", "param_groups", "seed", "state_dtype"):
        if key not in state_dict:
            raise ValueError(f"{owner}: missing field {key!r}")
    if state_dict["state_dtype"] != optimizer.state_dtype:
        raise ValueError(f"{owner}: state_dtype: expected {optimizer.state_dtype!r}, got "
                         f"{state_dict['state_dtype']!r}")
    seed = check_int(owner, "seed", state_dict["seed"], 0)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{owner}: param_groups: expected {len(optimizer.param_groups)} groups, got "
                         f"{len(saved_groups)}")
    new_groups, group_of = [], {}
    for g, (own, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if len(saved.get("params", ())) != len(own["params"]):
            raise ValueError(f"{owner}: param_groups[{g}]: expected {len(own['params'])} params, "
                             f"got {len(saved.get('params', ()))}")
        missing = sorted(set(own) - set(saved))
        if missing:
            raise ValueError(f"{owner}: param_groups[{g}]: missing hyperparameters {missing}")
        merged = {**saved, "params": own["params"]}
        optimizer._check_group(merged)
        new_groups.append(merged)
        for saved_index, p in zip(saved["params"], own["params"]):
            group_of[saved_index] = (p, merged)
    new_state = {}
    for saved_index, saved in state_dict["state"].items():
        if saved_index not in group_of:
            raise ValueError(f"{owner}: state[{saved_index!r}]: no parameter has this index")
        p, group = group_of[saved_index]
        new_state[optimizer.index_of(p)] = _checked_parameter_state(optimizer, owner, saved_index,
                                                                     saved, p, group)
    return new_groups, new_state, seed


def _checked_parameter_state(optimizer, owner: str, index, saved: dict, p, group: dict) -> dict:
    """Parameter p's saved state, checked against what `optimizer` would create, copied."""
    spec = optimizer._state_spec(p, group)
    where = f"{owner}: state[{index!r}] ({p.name or 'parameter'})"
    if set(saved) != {"step", *spec}:
        raise ValueError(f"{where}: expected fields {sorted({'step', *spec})}, got {sorted(saved)}")
    state = {"step": check_int(where, "step", saved["step"], 0)}
    for name, dtype in spec.items():
        array = saved[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{where}: {name} must be a NumPy array, got {type(array).__name__}")
        if array.shape != p.shape:
            raise ValueError(f"{where}: {name}: expected shape {p.shape}, got {array.shape}")
        if array.dtype != dtype:
            raise ValueError(f"{where}: {name}: expected dtype {dtype}, got {array.dtype}")
        state[name] = np.array(array, copy=True, order="C")
    return state
