"""Summing the ranks' gradients through the shared memory of one node (MPI-3 shared windows).

When every rank of a run is on one node, each rank's gradient buffer lies in a shared-memory
window (MPI_Win_allocate_shared) that every rank maps, so a rank reads the others' gradients
where they are, without a message copy:

    reduce-scatter  after backward, a barrier (every rank's gradients are finished); then rank r
                    adds the N ranks' values of its own range of the buffer, in rank order
                    (rank 0 + rank 1 + ... + rank N-1, the same order for every element), into
                    its own buffer; a barrier (no rank writes its buffer again before every sum
                    has read it).
    all-gather      without a sharded optimizer, rank r then copies every other rank's range
                    from that rank's buffer into its own, and a barrier: every rank holds the
                    same sums, bit for bit.

With `dist.shard_optimizer` the ranges are the ranks' shares of the optimizer step and the
all-gather is left out: an owner alone reads its range's summed gradients (npcpu.dist.shard).
Its pass that writes the sums also takes the gradient norm's sums of squares of its range's
chunks, bit for bit the ones a pass over the summed gradients would give
(npcpu.kernels.grads.sum_ranks_and_square_chunks), so the norm does not read them again.
The parameters are one copy on the node (`SharedParameters`), in a second window that every
rank's Parameters view: an owner's update is written where every rank reads it, and nothing
is copied back.

MPI's all-reduce over shared memory copies every byte through small buffers in turn, rank by
rank; here each byte is read once by the rank that sums it, and the ranks work at once. The sum
is the one-process sum to float32 rounding, as MPI's is. Between nodes, MPI's collectives serve
(npcpu.dist.reduce); `dist.shared_memory = false` uses them on one node too.

The windows live as long as the process (freeing one is a collective call that a failing rank
would never join); a later fit() of the same sizes reuses them.
"""

from __future__ import annotations

import math

import numpy as np

from npcpu.dist.reduce import GradientBuckets
from npcpu.dist.world import World, wait
from npcpu.kernels.grads import sum_ranks_and_square_chunks

CHUNK = 1 << 16
"""Elements added at a time: the running sum of a chunk stays in the core's cache."""

_NODE: dict = {}  # "comm": the node communicator of COMM_WORLD, made once
_WINDOWS: dict = {}  # (purpose, elements, dtype) -> (window, [each rank's array])


def one_node(world: World) -> bool:
    """Every rank of `world` shares this process's node (its memory)."""
    return world.size > 1 and world.local_size == world.size


def shared_arrays(world: World, purpose: str, elements: int, dtype,
                  one: bool = False) -> list[np.ndarray]:
    """One array of `elements` of `dtype` per rank, all in one window on this node: entry k is
    rank k's (this process writes its own and reads the others'). Zeros when new. `one`: a
    single array, in rank 0's memory, that every rank maps."""
    dtype = np.dtype(dtype)
    key = (purpose, elements, dtype.str, one)
    if key not in _WINDOWS:
        from mpi4py import MPI
        if "comm" not in _NODE:
            _NODE["comm"] = world.comm.Split_type(MPI.COMM_TYPE_SHARED)
        node = _NODE["comm"]
        owners = 1 if one else node.Get_size()
        mine = node.Get_rank() < owners
        window = MPI.Win.Allocate_shared(max(elements, 1) * dtype.itemsize if mine else 0,
                                         dtype.itemsize, comm=node)
        arrays = [np.frombuffer(window.Shared_query(k)[0], dtype, elements)
                  for k in range(owners)]
        if mine:
            arrays[node.Get_rank()].fill(0)
        _WINDOWS[key] = window, arrays
    return _WINDOWS[key][1]


def barrier(world: World, timeout: float, what: str) -> None:
    wait(world, [world.comm.Ibarrier()], timeout, what)


def add_ranks(sources: list[np.ndarray], out: np.ndarray, scratch: np.ndarray) -> None:
    """out = sources[0] + sources[1] + ... + sources[-1], added in that order (`out` may be one
    of `sources`). The running sum is kept in `out` itself, in one pass for two sources, a
    chunk of `scratch`'s size at a time for more (the chunk's running sum stays in the cache);
    in `scratch` when `out` is one of the sources added after the first two (the running sum
    would overwrite it before it is read)."""
    direct = not any(np.may_share_memory(out, source) for source in sources[2:])
    step = out.size if direct and len(sources) == 2 else scratch.size
    for start in range(0, out.size, max(step, 1)):
        stop = min(start + step, out.size)
        running = out[start:stop] if direct else scratch[:stop - start]
        np.add(sources[0][start:stop], sources[1][start:stop], out=running)
        for source in sources[2:]:
            running += source[start:stop]
        if not direct:
            out[start:stop] = running


def even_spans(total: int, ranks: int) -> list[tuple[int, int]]:
    """N near-equal (start, stop) ranges of a buffer of `total` elements, one per rank."""
    return [(r * total // ranks, (r + 1) * total // ranks) for r in range(ranks)]


class SharedMemorySum:
    """The gradients of `params` in this node's shared memory (reversed: the order backward
    finishes them, end to end), summed over the ranks as the module docstring says; rank r
    sums `spans[r]` of the buffer (npcpu.dist.shard's ranges when the optimizer is sharded; by
    default near-equal ones). `chunks`: where the chunks of this rank's range begin, then where
    the last ends (npcpu.dist.shard.OptimizerShard.chunk_starts): `reduce_scatter` can then
    give the chunks' sums of squares of the summed gradients, taken in the pass that sums them."""

    def __init__(self, world: World, params: list, spans: list[tuple[int, int]] | None,
                 timeout: float, chunks: np.ndarray | None = None):
        self.world, self.timeout = world, timeout
        total = sum(p.size for p in params)
        dtype = params[0].compute_dtype
        self.arrays = shared_arrays(world, "gradients", total, dtype)
        self.buckets = GradientBuckets(params, math.inf,
                                       allocate=lambda size, _: self.arrays[world.rank])
        self.ranges = spans or even_spans(total, world.size)
        self.scratch = np.empty(min(CHUNK, max(total, 1)), dtype)
        if chunks is not None and (chunks[0], chunks[-1]) != self.ranges[world.rank]:
            raise ValueError(f"SharedMemorySum: the chunks of rank {world.rank} span elements "
                             f"{chunks[0]} to {chunks[-1]} of the gradients, its range is "
                             f"{self.ranges[world.rank]}")
        self.chunks = chunks

    def reduce_scatter(self, squares: bool = False) -> np.ndarray | None:
        """This rank's range of its buffer becomes the sum over the ranks of that range. With
        `squares` (and `chunks`), the sums of squares of the summed chunks are taken in the same
        pass and returned (float64, one per chunk: bit for bit
        npcpu.kernels.grads.chunk_power_sums' partials of each parameter's piece)."""
        self.buckets.attach()
        barrier(self.world, self.timeout, "the ranks finishing their gradients")
        start, stop = self.ranges[self.world.rank]
        mine = self.arrays[self.world.rank]
        partials = None
        if squares and self.chunks is not None:
            partials = np.zeros(self.chunks.size - 1)
            sum_ranks_and_square_chunks(tuple(self.arrays), mine, self.chunks, partials)
        else:
            add_ranks([a[start:stop] for a in self.arrays], mine[start:stop], self.scratch)
        barrier(self.world, self.timeout, "the ranks adding their ranges of the gradients")
        return partials

    def allreduce(self) -> None:
        """Every rank's buffer becomes the sum over the ranks."""
        self.reduce_scatter()
        self.allgather()

    def allgather(self) -> None:
        """After `reduce_scatter`: every rank copies the others' summed ranges into its buffer."""
        mine = self.arrays[self.world.rank]
        for r, (start, stop) in enumerate(self.ranges):
            if r != self.world.rank:
                mine[start:stop] = self.arrays[r][start:stop]
        barrier(self.world, self.timeout, "the ranks copying the summed gradients")


class SharedParameters:
    """The parameters of `params` stored once on this node, in a window every rank maps, and
    every rank's Parameters viewing that one copy: after an optimizer step sharded by pieces
    (npcpu.dist.shard), each owner has written its pieces where every rank reads them, and
    `publish` is a barrier (no rank reads the parameters of the next step before every owner has
    written its pieces). No rank writes parameters while another reads them: an owner updates
    only after the gradient sum's first barrier (every rank's backward finished), and the
    forward of the next step starts after `publish`'s barrier."""

    ALIGNMENT = 64  # bytes: each parameter starts on a cache line (and is aligned for any dtype)

    def __init__(self, world: World, params: list, timeout: float):
        self.world, self.timeout, self.params = world, timeout, params
        self.ids = {id(p) for p in params}
        sizes = [-(-p.data.nbytes // self.ALIGNMENT) * self.ALIGNMENT for p in params]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        window = shared_arrays(world, "parameters", int(offsets[-1]), np.uint8, one=True)[0]
        self.views = [window[start:start + p.data.nbytes].view(p.data.dtype).reshape(p.shape)
                      for p, start in zip(params, offsets)]
        self.attach()

    def holds(self, p) -> bool:
        """`p` is one of the parameters in the window."""
        return id(p) in self.ids

    def attach(self) -> None:
        """Every rank: make each parameter's storage its place in the window again, if some rank
        replaced it (loading a state dict; a new fit), with rank 0's values (the ranks' parameters
        are equal: broadcast at the start, hashed at each checkpoint). Collective: one small
        all-reduce, and barriers when something was replaced."""
        from mpi4py import MPI
        replaced = np.array([any(p.data is not view for p, view in zip(self.params, self.views))],
                            dtype=np.int64)
        wait(self.world, [self.world.comm.Iallreduce(MPI.IN_PLACE, replaced, op=MPI.MAX)],
             self.timeout, "the ranks checking their parameters are in the window")
        if not replaced[0]:
            return
        barrier(self.world, self.timeout, "the ranks done reading the window's parameters")
        if self.world.rank == 0:
            for p, view in zip(self.params, self.views):
                if p.data is not view:
                    view[...] = p.data
        barrier(self.world, self.timeout, "rank 0 writing the parameters into the window")
        for p, view in zip(self.params, self.views):
            p.data = view

    def detach(self) -> None:
        """Give each parameter a private copy of its values again (at the end of a fit: a later
        fit of a model of the same size reuses the window; `attach` brings them back)."""
        for p, view in zip(self.params, self.views):
            if p.data is view:
                p.data = view.copy()

    def publish(self) -> None:
        """After the owners' step: every owner's pieces written (the parameters are one copy)."""
        barrier(self.world, self.timeout, "the owners updating their parameters")
