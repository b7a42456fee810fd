"""The optimizer step shared among the ranks (ZeRO stage 1, by whole parameters):
`dist.shard_optimizer`.

Each parameter has one owner rank, which alone runs the optimizer on it and alone keeps its
optimizer state (moments, master copy); after the step the owners broadcast the parameters they
updated (on one node, through shared memory: npcpu.dist.node). An owner's update is the one
every rank would have made (the same gradient, state and stochastic-rounding stream), so a
sharded run is bitwise the run without sharding, for the optimizer work of about 1/N of the
model and the memory of about 1/N of the optimizer state per rank (Lookahead's slow weights
stay on every rank).

The gradient norm is summed from the owners (each the sum of squares of its own gradients) and
only a rank's own gradients are clipped (`gradient_norm`); the freezer takes its layers' norms
from the owners' sums too (`norm_of`). So when every rank is on one node and there is no loss
scaler, a rank needs only its own parameters' summed gradients: the gradients are reduce-scattered
to their owners (npcpu.dist.node), half the work of an all-reduce on 2 ranks. (The loss scaler's
check reads every gradient: with one, they are all-reduced whole; a non-finite norm has them
gathered whole too, for the error that names the first non-finite layer.)

Parameters are dealt whole, largest first, each to the rank owning the fewest elements so far:
LAMB's trust ratio and Lookahead's sync then need nothing from another rank. Before a checkpoint
the owners send their parameters' optimizer state and slow weights to rank 0 (which writes all of
it, then drops the others' state again), and before an evaluation they broadcast Lookahead's slow
weights (each owner synced its own).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from npcpu.dist.node import SharedParameters, one_node
from npcpu.dist.reduce import sum_in_order
from npcpu.dist.world import World, wait
from npcpu.kernels.grads import power_sum


def deal(sizes: list[int], ranks: int) -> list[int]:
    """The owner rank of each of the parameters of `sizes` elements: largest first, each to the
    rank with the fewest elements so far (the lower rank on a tie)."""
    owners, load = [0] * len(sizes), [0] * ranks
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


class OptimizerShard:
    """This rank's share of the optimizer step of `optimizer` (an Optimizer, or a Lookahead around
    one) in `world`: the module docstring."""

    def __init__(self, optimizer, world: World, timeout: float, shared_memory: bool = True):
        self.lookahead = optimizer if hasattr(optimizer, "slow_weights") else None
        self.inner = optimizer.optimizer if self.lookahead is not None else optimizer
        self.world, self.timeout = world, timeout
        self.params = [p for _, p in self.inner.indexed_params()]
        self.owners = deal([p.size for p in self.params], world.size)
        self.squares: dict = {}  # id(param) -> its sum of squared gradients (gradient_norm)
        self.shared = SharedParameters(world, self.params, self.owners, timeout) \
            if shared_memory and one_node(world) else None
        self.drop_others_state()

    def owner_of(self, params: list) -> list[int]:
        """The owner rank of each of `params` (rank 0 for one the optimizer does not hold)."""
        owner = {id(p): o for p, o in zip(self.params, self.owners)}
        return [owner.get(id(p), 0) for p in params]

    def describe(self) -> str:
        mine = [p.size for p, owner in zip(self.params, self.owners) if owner == self.world.rank]
        return (f"optimizer step sharded by parameter: rank {self.world.rank} owns {len(mine)} of "
                f"{len(self.params)} ({sum(mine) / sum(p.size for p in self.params):.0%} of the "
                "elements)")

    @contextlib.contextmanager
    def own_parameters_only(self):
        """Within it, the parameters of the other ranks are frozen: an optimizer step (and
        Lookahead's sync) leaves them and their state alone."""
        others = [p for p, owner in zip(self.params, self.owners)
                  if owner != self.world.rank and not p.frozen]
        for p in others:
            p.frozen = True
        try:
            yield
        finally:
            for p in others:
                p.frozen = False

    def gradient_norm(self, params: list, max_norm: float | None, check: bool,
                      keep_squares: bool = False) -> float:
        """The total 2-norm of the gradients of `params` (the trainable ones), and with `max_norm`
        this rank's own gradients clipped to it (the only ones its optimizer step reads). Each
        owner sums the squares of its own gradients; the sums are gathered and added in
        parameter order, the order npcpu.optim.clip adds them in: the same norm, bit for bit.
        With `check`, a non-finite norm leaves every gradient as it is. `keep_squares`: keep
        each parameter's sum of squares after clipping for `norm_of` (the freezer's)."""
        mine = {id(p) for p, owner in zip(self.params, self.owners) if owner == self.world.rank}
        squares = self._squares(params, mine)
        total = math.sqrt(sum(float(square) for square in squares))
        if keep_squares:
            self.squares = dict(zip(map(id, params), squares.tolist()))
        if max_norm is None or (check and not math.isfinite(total)):
            return total
        coef = min(max_norm / (total + 1e-6), 1.0)  # as clip_grad_norm
        if coef != 1.0:
            squares = np.zeros(len(params))
            with np.errstate(invalid="ignore"):
                for i, p in enumerate(params):
                    if id(p) in mine:
                        grad = p.grad
                        if keep_squares:  # the scaled gradient's squares in the same pass
                            squares[i] = power_sum(grad.reshape(-1), 2.0,
                                                   grad.dtype.type(coef))
                        else:
                            grad *= grad.dtype.type(coef)
            if keep_squares:
                sum_in_order(self.world, squares, self.timeout)
                self.squares = dict(zip(map(id, params), squares.tolist()))
        return total

    def norm_of(self, params: list) -> float:
        """The 2-norm of the gradients of `params` (trainable, all among those of the last
        `gradient_norm`, after its clipping), from the owners' sums of squares: bit for bit
        npcpu.optim.clip.get_total_norm of the summed gradients."""
        return math.sqrt(sum(self.squares[id(p)] for p in params
                             if not p.frozen and p.grad is not None))

    def _squares(self, params: list, mine: set) -> np.ndarray:
        """Each parameter's sum of squared gradients, from its owner."""
        squares = np.zeros(len(params))
        for i, p in enumerate(params):
            if id(p) in mine:
                squares[i] = power_sum(p.grad.reshape(-1), 2.0)
        return sum_in_order(self.world, squares, self.timeout)

    def publish_parameters(self) -> None:
        """Every rank takes each parameter (as bytes) from its owner: through this node's shared
        memory when every rank is on it (npcpu.dist.node), else by MPI broadcasts."""
        if self.shared is not None:
            self.shared.publish()
            return
        self._wait([self.world.comm.Ibcast(p.data.reshape(-1).view(np.uint8), root=owner)
                    for p, owner in zip(self.params, self.owners) if not p.frozen],
                   "the broadcast of the updated parameters from their owners")

    def publish_slow_weights(self) -> None:
        """Every rank takes Lookahead's slow weights of each parameter from its owner."""
        if self.lookahead is not None:
            slow = self.lookahead.slow_weights
            self._wait([self.world.comm.Ibcast(slow[i].reshape(-1).view(np.uint8), root=owner)
                        for i, owner in enumerate(self.owners)],
                       "the broadcast of the slow weights from their owners")

    def gather_state(self) -> None:
        """Rank 0 takes the optimizer state and slow weights of each parameter from its owner
        (all of it: what a checkpoint holds); the other ranks send theirs."""
        from mpi4py import MPI
        world, state = self.world, self.inner.state
        headers = np.zeros((len(self.params), 2), dtype=np.int64)  # (has state, step) per parameter
        for i, owner in enumerate(self.owners):
            if owner == world.rank and i in state:
                headers[i] = 1, state[i]["step"]
        self._wait([world.comm.Iallreduce(MPI.IN_PLACE, headers, op=MPI.SUM)],
                   "the exchange of the optimizer state headers")
        requests = []
        for i, (p, owner) in enumerate(zip(self.params, self.owners)):
            if owner == 0 or world.rank not in (0, owner):
                continue
            arrays = []
            if headers[i, 0]:
                if world.rank == 0:
                    state[i] = self.inner.initial_state(p)
                    state[i]["step"] = int(headers[i, 1])
                arrays = [state[i][name] for name in sorted(state[i]) if name != "step"]
            if self.lookahead is not None:
                arrays.append(self.lookahead.slow_weights[i])
            for tag, array in enumerate(arrays):
                buffer = array.reshape(-1).view(np.uint8)
                requests.append(world.comm.Irecv(buffer, source=owner, tag=tag) if world.rank == 0
                                else world.comm.Isend(buffer, dest=0, tag=tag))
        self._wait(requests, "sending the optimizer state to rank 0")

    def drop_others_state(self) -> None:
        """Forget the optimizer state of the parameters other ranks own (rank 0 after writing a
        checkpoint)."""
        for i, owner in enumerate(self.owners):
            if owner != self.world.rank:
                self.inner.state.pop(i, None)

    def _wait(self, requests: list, what: str) -> None:
        wait(self.world, requests, self.timeout, what)
