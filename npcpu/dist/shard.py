"""The optimizer step shared among the ranks (ZeRO stage 1, by ranges of elements):
`dist.shard_optimizer`.

The parameters are laid end to end in the order of the gradient buffer (reversed: the order
backward finishes them) and cut into N near-equal ranges, one per rank; a cut falls inside a
parameter only at a multiple of SPLIT_UNIT elements from its first, so a parameter is one piece
or a few consecutive pieces, each with one owner. An owner alone runs the optimizer on its pieces
and keeps their optimizer state (a split parameter's state arrays are whole on each of its owners,
each reading and writing only its range); after the step the owners publish the elements they
updated (on one node by writing them into the one copy of the parameters every rank views,
npcpu.dist.node; else by broadcasts). An owner's update is the one every rank would have made
(the same gradient, state and stochastic-rounding bits, which are keyed by element), so a
sharded run is bitwise the run without sharding, for the optimizer work of about 1/N of the
model per rank.

What needs more than one piece of a parameter is a sum over the whole tensor: the gradient norm
(clipping, the freezer's layer norms) and LAMB's trust ratio (the norms of the weights and of the
update). The kernels sum a tensor in fixed chunks (npcpu.kernels.grads.CHUNK; LAMB's
npcpu.kernels.optim_io.BLOCK), each into a float64 partial, and add the partials in chunk order.
SPLIT_UNIT is a multiple of both, so each owner computes the partials of its own chunks;
`fold_partial_sums` gathers them (one small message for all the parameters of one sum, each
slot written by one rank, so the message's sum is exact) and every rank adds them in chunk
order: the one-process sum, bit for bit.

So without a loss scaler (and without deterministic sums) a rank needs only its own range's
summed gradients: the gradients are reduce-scattered to their owners (on one node through shared
memory, npcpu.dist.node, whose pass also takes the chunks' sums of squares for the gradient norm:
`own_chunks`; between nodes by MPI_Ireduce_scatter, npcpu.dist.reduce), half the work and bytes
of an all-reduce. (The loss scaler's check reads every gradient: with one, they are
all-reduced whole; a non-finite norm has them gathered whole too, for the error that names the
first non-finite layer.) Before a checkpoint the owners send their ranges of the optimizer state
and slow weights to rank 0 (which writes all of it, then drops the state of parameters it owns no
piece of), and before an evaluation they publish Lookahead's slow weights (each owner synced its
own ranges).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from npcpu.dist.node import SharedParameters, one_node
from npcpu.dist.reduce import sum_in_order
from npcpu.dist.world import World, wait
from npcpu.kernels.grads import CHUNK, chunk_power_sums
from npcpu.kernels.optim_io import BLOCK, ELEMENTS_PER_HASH
from npcpu.optim.clip import norm_from_squares

SPLIT_UNIT = math.lcm(CHUNK, BLOCK, ELEMENTS_PER_HASH)
"""A parameter is cut only at multiples of this many elements (counted from its first element)."""


def cuts(sizes: list[int], ranks: int, unit: int = SPLIT_UNIT) -> list[int]:
    """The N + 1 offsets where the ranks' ranges of the parameters laid end to end begin and end
    (0 first, the total last): cut r is the position nearest r * total / N (the lower on a tie)
    that is a parameter's edge or a multiple of `unit` from a parameter's first element."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    total = starts[-1]
    offsets = [0]
    for r in range(1, ranks):
        target = r * total // ranks
        i = max(int(np.searchsorted(starts, target, side="right")) - 1, 0)
        i = min(i, len(sizes) - 1)
        below = starts[i] + (target - starts[i]) // unit * unit
        candidates = [below, min(below + unit, starts[i + 1]), starts[i + 1]]
        cut = min(candidates, key=lambda c: (abs(c - target), c))
        offsets.append(max(cut, offsets[-1]))
    return offsets + [total]


def pieces(sizes: list[int], offsets: list[int]) -> list[list[tuple[int, int, int]]]:
    """Each parameter's pieces (owner rank, first element, stop element), for the parameters of
    `sizes` laid end to end and cut at `offsets` (see `cuts`). A parameter with no elements is
    one empty piece of rank 0's."""
    result, start = [], 0
    for size in sizes:
        stop = start + size
        own = [(r, max(start, a) - start, min(stop, b) - start)
               for r, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))
               if max(start, a) < min(stop, b)]
        result.append(own or [(0, 0, 0)])
        start = stop
    return result


def own_chunks(in_buffer: list, pieces: dict, start: int,
               rank: int) -> tuple[np.ndarray, dict]:
    """The chunks of `rank`'s range of the gradient buffer (`in_buffer`'s parameters end to end,
    the range from element `start`): each piece of a parameter it owns cut into CHUNK elements
    from the piece's first (a multiple of CHUNK from the parameter's first), as chunk_power_sums
    cuts that piece. Returns (where each chunk begins, then where the last ends; id(p) -> the
    index of p's first chunk)."""
    starts, first_chunk, offset = [start], {}, 0
    for p in in_buffer:
        for owner, first, stop in pieces[id(p)]:
            if owner == rank and stop > first:
                first_chunk[id(p)] = len(starts) - 1
                starts.extend(range(offset + first + CHUNK, offset + stop, CHUNK))
                starts.append(offset + stop)
        offset += p.size
    return np.array(starts, dtype=np.int64), first_chunk


def fold(partials: np.ndarray) -> np.ndarray:
    """Each row of `partials` (rows, chunks) added left to right, as the kernels add their chunks'
    sums (0.0 for no chunks)."""
    if partials.shape[1] == 0:
        return np.zeros(partials.shape[0])
    return np.add.accumulate(partials, axis=1)[:, -1]


class OptimizerShard:
    """This rank's share of the optimizer step of `optimizer` (an Optimizer, or a Lookahead around
    one) in `world`, `params` being the model's parameters (the gradient buffer holds them
    reversed): the module docstring. Within `own_share_only`, the optimizer steps this rank's
    pieces (npcpu.optim.Optimizer.share)."""

    def __init__(self, optimizer, params: list, world: World, timeout: float,
                 shared_memory: bool = True):
        self.lookahead = optimizer if hasattr(optimizer, "slow_weights") else None
        self.inner = optimizer.optimizer if self.lookahead is not None else optimizer
        self.world, self.timeout = world, timeout
        self.params = [p for _, p in self.inner.indexed_params()]
        in_buffer = list(reversed(params))
        self.offsets = cuts([p.size for p in in_buffer], world.size)
        self.pieces = {id(p): own for p, own in
                       zip(in_buffer, pieces([p.size for p in in_buffer], self.offsets))}
        for p in self.params:  # one the model does not hold: rank 0's, whole
            self.pieces.setdefault(id(p), [(0, 0, p.size)])
        self.mine = {key: (first, stop) for key, own in self.pieces.items()
                     for rank, first, stop in own if rank == world.rank}
        self.chunk_starts, self.first_chunk = own_chunks(in_buffer, self.pieces,
                                                         self.offsets[world.rank], world.rank)
        self.squares: dict = {}  # id(param) -> its sum of squared gradients (gradient_norm)
        self.shared = SharedParameters(world, self.params, timeout) \
            if shared_memory and one_node(world) else None
        self.drop_others_state()

    def spans(self) -> list[tuple[int, int]]:
        """Each rank's (start, stop) in the gradient buffer (the model's parameters reversed)."""
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    def range_of(self, p) -> tuple[int, int] | None:
        """The elements (first, stop) of `p` this rank updates, or None."""
        return self.mine.get(id(p))

    def is_split(self, p) -> bool:
        """`p` has more than one owner."""
        return len(self.pieces.get(id(p), ())) > 1

    def describe(self) -> str:
        mine = sum(stop - first for first, stop in self.mine.values())
        split = sum(self.is_split(p) for p in self.params)
        return (f"optimizer step sharded by parameter: rank {self.world.rank} owns pieces of "
                f"{len(self.mine)} of {len(self.params)} ({split} split between ranks; "
                f"{mine / max(sum(p.size for p in self.params), 1):.0%} of the elements)")

    @contextlib.contextmanager
    def own_share_only(self):
        """Within it, an optimizer step (and Lookahead's sync) updates only this rank's pieces
        and leaves the rest of the parameters and their state alone (on one node, in the
        parameters' one copy that every rank views: attached first, if some rank's were
        replaced)."""
        if self.shared is not None:
            self.shared.attach()
        self.inner.share = self
        try:
            yield
        finally:
            self.inner.share = None

    def fold_partial_sums(self, partials: dict, unit: int, params: list,
                          rows: int) -> list[np.ndarray]:
        """The whole-tensor sums (`rows` of them) of each of `params` (the same list on every
        rank): `partials` maps id(p) to this rank's (rows, chunks) float64 sums of the
        `unit`-element chunks of its range of p, for each p of `params` it has a piece of. The
        owners' chunk sums are gathered in one message and each row added in chunk order."""
        chunks = [-(-p.size // unit) for p in params]
        starts = np.concatenate([[0], np.cumsum(chunks, dtype=np.int64)]).tolist()
        slots = np.zeros((rows, starts[-1]))
        for k, p in enumerate(params):
            if id(p) in partials:
                first = starts[k] + self.mine[id(p)][0] // unit
                slots[:, first:first + partials[id(p)].shape[1]] = partials[id(p)]
        sum_in_order(self.world, slots, self.timeout)
        return [fold(slots[:, starts[k]:starts[k + 1]]) for k in range(len(params))]

    def _sums_of_squares(self, params: list, scale=None, summed=None) -> list[float]:
        """Each of `params`' sum of squared gradients (with `scale`, after scaling this rank's
        ranges by it in the same pass), from its owners' chunks: from `summed` (the chunks' sums
        of squares, one per chunk of `chunk_starts`) where it has them."""
        partials = {}
        for p in params:
            span = self.mine.get(id(p))
            if span is None:
                continue
            first, stop = span
            chunks = -(-(stop - first) // CHUNK)
            if summed is not None and id(p) in self.first_chunk:
                c = self.first_chunk[id(p)]
                partials[id(p)] = summed[None, c:c + chunks]
            else:
                partials[id(p)] = np.zeros((1, chunks))
                chunk_power_sums(p.grad.reshape(-1)[first:stop], 2.0, partials[id(p)][0], scale)
        return [float(total[0]) for total in self.fold_partial_sums(partials, CHUNK, params, 1)]

    def gradient_norm(self, params: list, max_norm: float | None, check: bool,
                      keep_squares: bool = False,
                      summed_squares: np.ndarray | None = None) -> float:
        """The total 2-norm of the gradients of `params` (the trainable ones), and with `max_norm`
        this rank's ranges of the gradients clipped to it (the only ones its optimizer step reads).
        Each parameter's sum of squares comes from its owners' chunks (`fold_partial_sums`) and
        the sums are added in parameter order, the order npcpu.optim.clip adds them in: the same
        norm, bit for bit. With `check`, a non-finite norm leaves every gradient as it is.
        `keep_squares`: keep each parameter's sum of squares after clipping for `norm_of` (the
        freezer's). `summed_squares`: this rank's chunks' sums of squares of the gradients as they
        are now, taken by the pass that summed them (npcpu.dist.node.SharedMemorySum), instead
        of reading the gradients again."""
        squares = self._sums_of_squares(params, summed=summed_squares)
        total = math.sqrt(sum(squares))
        if keep_squares:
            self.squares = dict(zip(map(id, params), squares))
        if max_norm is None or (check and not math.isfinite(total)):
            return total
        coef = min(max_norm / (total + 1e-6), 1.0)  # as clip_grad_norm
        if coef != 1.0:
            with np.errstate(invalid="ignore"):
                if keep_squares:  # the scaled gradients' squares in the same pass
                    scale = params[0].grad.dtype.type(coef) if params else None
                    self.squares = dict(zip(map(id, params), self._sums_of_squares(params, scale)))
                else:
                    for p in params:
                        span = self.mine.get(id(p))
                        if span is not None:
                            grad = p.grad.reshape(-1)[span[0]:span[1]]
                            grad *= grad.dtype.type(coef)
        return total

    def norm_of(self, params: list) -> float:
        """The 2-norm of the gradients of `params` (trainable, all among those of the last
        `gradient_norm`, after its clipping), from the owners' sums of squares: bit for bit
        npcpu.optim.clip.get_total_norm of the summed gradients."""
        return norm_from_squares(self.squares, params)

    def publish_parameters(self) -> None:
        """Every rank takes each piece of each parameter (as bytes) from its owner: on one node
        the owners wrote them into the one copy every rank views (npcpu.dist.node), else by MPI
        broadcasts."""
        if self.shared is not None:
            self.shared.publish()
            return
        self._wait([self.world.comm.Ibcast(piece_bytes(p.data, first, stop), root=owner)
                    for p in self.params if not p.frozen
                    for owner, first, stop in self.pieces[id(p)]],
                   "the broadcast of the updated parameters from their owners")

    def publish_slow_weights(self) -> None:
        """Every rank takes Lookahead's slow weights of each piece from its owner."""
        if self.lookahead is not None:
            slow = self.lookahead.slow_weights
            self._wait([self.world.comm.Ibcast(piece_bytes(slow[i], first, stop), root=owner)
                        for i, p in enumerate(self.params)
                        for owner, first, stop in self.pieces[id(p)]],
                       "the broadcast of the slow weights from their owners")

    def gather_state(self) -> None:
        """Rank 0 takes the optimizer state and slow weights of each piece from its owner (all of
        it: what a checkpoint holds); the other ranks send theirs."""
        from mpi4py import MPI
        world, state = self.world, self.inner.state
        headers = np.zeros((len(self.params), 2), dtype=np.int64)  # (has state, step) per parameter
        for i, p in enumerate(self.params):
            if id(p) in self.mine and i in state:
                headers[i] = 1, state[i]["step"]
        self._wait([world.comm.Iallreduce(MPI.IN_PLACE, headers, op=MPI.MAX)],
                   "the exchange of the optimizer state headers")
        requests = []
        for i, p in enumerate(self.params):
            if world.rank == 0 and headers[i, 0] and i not in state:
                state[i] = self.inner.initial_state(p)
                state[i]["step"] = int(headers[i, 1])
            for owner, first, stop in self.pieces[id(p)]:
                if owner == 0 or world.rank not in (0, owner):
                    continue
                arrays = [state[i][name] for name in sorted(state[i]) if name != "step"] \
                    if headers[i, 0] else []
                if self.lookahead is not None:
                    arrays.append(self.lookahead.slow_weights[i])
                for tag, array in enumerate(arrays):
                    buffer = piece_bytes(array, first, stop)
                    requests.append(world.comm.Irecv(buffer, source=owner, tag=tag)
                                    if world.rank == 0 else
                                    world.comm.Isend(buffer, dest=0, tag=tag))
        self._wait(requests, "sending the optimizer state to rank 0")

    def drop_others_state(self) -> None:
        """Forget the optimizer state of the parameters this rank owns no piece of (rank 0 after
        writing a checkpoint)."""
        for i, p in enumerate(self.params):
            if id(p) not in self.mine:
                self.inner.state.pop(i, None)

    def _wait(self, requests: list, what: str) -> None:
        wait(self.world, requests, self.timeout, what)


def piece_bytes(array: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Elements first .. stop - 1 of `array` (in C order) as a view of bytes."""
    return array.reshape(-1)[first:stop].view(np.uint8)
