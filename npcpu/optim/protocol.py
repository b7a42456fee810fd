"""The interface the Trainer calls on an optimizer (npcpu.optim.Optimizer and Lookahead implement it).

The Trainer checks for it once, when it is built, and never probes an optimizer for optional
attributes: anything that has these methods trains.
"""

from __future__ import annotations

from typing import ContextManager, Protocol, runtime_checkable


@runtime_checkable
class TrainerOptimizer(Protocol):
    """What npcpu.train.Trainer calls on an optimizer: Optimizer and Lookahead implement it.

    param_groups         list of dicts with "params" and "lr" (schedulers write "lr")
    fused_into_backward  True once the parameters are updated inside backward
    step(), zero_grad(), state_dict(), load_state_dict(state)   as in torch
    fuse_into_backward() update each parameter inside backward from now on (TypeError or
                         ValueError, saying why, where this optimizer cannot)
    evaluation_weights() a context manager within which the parameters hold the weights to
                         evaluate (the parameters themselves, or Lookahead's slow weights)
    describe()           a short name for logs: "AdamW", "Lookahead(LAMB)"
    """

    param_groups: list
    fused_into_backward: bool

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...

    def fuse_into_backward(self) -> None: ...

    def evaluation_weights(self) -> ContextManager: ...

    def describe(self) -> str: ...
