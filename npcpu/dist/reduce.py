"""Summing the gradients of the ranks: flat buckets, non-blocking all-reduce, and a fixed-order sum.

Every parameter's gradient accumulator is a view into one of a few flat buffers ("buckets" of
about `bucket_bytes`, parameters in reverse order: the order backward finishes them), so that a
reduction is a handful of buffer-based MPI calls on contiguous NumPy arrays, never per parameter
and never pickled.

Three ways to add the ranks' gradients:

    overlapped      (`BackwardReducer`) during the backward pass of a window's last micro-batch,
                    each layer hands its finished gradient over through the in-backward update
                    protocol of npcpu.nn.parameter (the reducer stands in for an optimizer); a
                    bucket's MPI_Iallreduce starts as soon as its last parameter arrived, and the
                    reduction runs while backward goes on through the earlier layers.
    all-reduce      one MPI_Iallreduce(SUM) per bucket after backward, all in flight at once.
                    In both, the order in which
                    MPI adds the ranks' partial sums depends on N (and on the algorithm MPI
                    picks), so the result equals one process's to float32 rounding, not bitwise.
                    With the optimizer sharded (npcpu.dist.shard), each rank needs only its own
                    span's sums (`SpanSums`: a reduce-scatter), overlapped or after backward,
                    half the bytes of an all-reduce over each link.
    fixed order     the global batch is cut into `parts` equal pieces whatever N is; each rank
                    keeps one gradient sum per piece it owns, and the pieces are added strictly in
                    order, part 0 + part 1 + ..., each rank continuing the running sum of the rank
                    before it (a chain of point-to-point messages), then the total is broadcast.
                    Additions happen in the same order for every N, so the result is bitwise the
                    same (npcpu.dist.trainer: `deterministic`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from npcpu.dist.world import World, wait


class GradientBuckets:
    """The gradient accumulators of `params`, as views into flat buckets of `bucket_bytes` or so,
    the parameters reversed, each bucket made by `allocate(elements, dtype)` (default: zeros of
    this process; npcpu.dist.node: shared memory)."""

    def __init__(self, params: list, bucket_bytes: float, *, allocate=np.zeros):
        dtypes = {p.compute_dtype for p in params}
        if len(dtypes) != 1:
            raise TypeError(f"GradientBuckets: the parameters' gradients must share one dtype, "
                            f"got {sorted(str(d) for d in dtypes)}")
        dtype = dtypes.pop()
        groups, sizes = [[]], [0]
        for p in reversed(params):
            if sizes[-1] and (sizes[-1] + p.size) * dtype.itemsize > bucket_bytes:
                groups.append([])
                sizes.append(0)
            groups[-1].append(p)
            sizes[-1] += p.size
        self.buffers = [allocate(size, dtype) for size in sizes]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()[:-1]
        self.views = []
        for group, buffer in zip(groups, self.buffers):
            offset = 0
            for p in group:
                self.views.append((p, buffer[offset:offset + p.size].reshape(p.shape)))
                offset += p.size
        self.attach()

    def attach(self) -> None:
        """Make every accumulator its bucket view again, holding the gradient it holds now (zeros
        where it is marked zero): code that replaced an accumulator loses nothing."""
        for p, view in self.views:
            accumulator = p.grad_buffer()
            if accumulator is not view:
                view[...] = accumulator
                p.grad = view

    def allreduce(self, world: World, timeout: float) -> None:
        """Sum the buckets over the ranks in place (MPI_Iallreduce, all buckets in flight)."""
        from mpi4py import MPI
        self.attach()
        requests = [world.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
                    for buffer in self.buffers]
        wait(world, requests, timeout, "the gradient all-reduce")


class SpanSums:
    """The sum over the ranks of each rank's span (start, stop) of `buckets` laid end to end,
    onto that rank only (`spans` in rank order, tiling the buffer; the rest of a rank's buckets
    is left undefined): for each bucket, an MPI_Ireduce to the one rank whose span holds all of
    it, else an MPI_Ireduce_scatter into a scratch array that `settle` copies into place. Half
    the bytes of an all-reduce over each link. (Not a reduce-scatter in place: MPICH's TCP path
    then copies a rank's own block onto itself and aborts.)"""

    def __init__(self, buckets: GradientBuckets, spans: list[tuple[int, int]], rank: int):
        self.buckets, self.rank = buckets, rank
        self.shares = []  # per bucket: (each rank's count, each rank's displacement)
        for start, buffer in zip(buckets.starts, buckets.buffers):
            stop = start + buffer.size
            self.shares.append(([max(0, min(stop, b) - max(start, a)) for a, b in spans],
                                [min(max(a, start), stop) - start for a, _ in spans]))
        self.scratch = [np.empty(counts[rank], buffer.dtype) if self.split(counts) else None
                        for buffer, (counts, _) in zip(buckets.buffers, self.shares)]

    @staticmethod
    def split(counts: list[int]) -> bool:
        return sum(count > 0 for count in counts) > 1

    def start(self, world: World, bucket: int):
        """Start the sums of bucket `bucket`; the request."""
        from mpi4py import MPI
        buffer, (counts, _) = self.buckets.buffers[bucket], self.shares[bucket]
        if self.split(counts):
            return world.comm.Ireduce_scatter(buffer, self.scratch[bucket], counts, op=MPI.SUM)
        root = next((r for r, count in enumerate(counts) if count), 0)
        mine = world.rank == root
        return world.comm.Ireduce(MPI.IN_PLACE if mine else buffer, buffer if mine else None,
                                  op=MPI.SUM, root=root)

    def settle(self, bucket: int) -> None:
        """After `start`'s request completed: this rank's sum in its place in the bucket."""
        scratch = self.scratch[bucket]
        if scratch is not None and scratch.size:
            first = self.shares[bucket][1][self.rank]
            self.buckets.buffers[bucket][first:first + scratch.size] = scratch

    def reduce(self, world: World, timeout: float) -> None:
        """The whole of it after backward: every bucket in flight at once."""
        self.buckets.attach()
        wait(world, [self.start(world, b) for b in range(len(self.buckets.buffers))], timeout,
             "the gradient reduce-scatter")
        for bucket in range(len(self.buckets.buffers)):
            self.settle(bucket)

    def gather(self, world: World, timeout: float) -> None:
        """After `reduce`: every rank's buckets whole, each span's piece broadcast by its rank."""
        requests = [world.comm.Ibcast(buffer[first:first + count], root=r)
                    for buffer, (counts, firsts) in zip(self.buckets.buffers, self.shares)
                    for r, (count, first) in enumerate(zip(counts, firsts)) if count]
        wait(world, requests, timeout, "the all-gather of the summed gradients")


class BackwardReducer:
    """The overlapped reduction of the module docstring: an InBackwardUpdater (npcpu.nn.parameter)
    that copies each parameter's finished gradient into its bucket view and starts a bucket's
    Iallreduce when all its parameters arrived (with `span_sums`, each rank's span of the
    buckets onto that rank only: SpanSums). `arm` before the backward of a
    window's last micro-batch, `finish` after it. Non-blocking collectives must start in the
    same order on every rank: they do, since every rank runs the same backward pass."""

    element_alignment = 1

    def __init__(self, buckets: GradientBuckets, world: World,
                 span_sums: SpanSums | None = None):
        self.buckets, self.world, self.span_sums = buckets, world, span_sums
        self.place = {}  # id(param) -> (bucket index, flat view)
        for p, view in buckets.views:
            self.place[id(p)] = (next(i for i, b in enumerate(buckets.buffers)
                                      if np.shares_memory(b, view)), view.reshape(-1))
        self.requests: list = []
        self.missing: list[int] = []
        self.arrived: set = set()

    def arm(self, first_of_window: bool) -> None:
        """Take the gradients of the coming backward pass. `first_of_window`: no earlier
        micro-batch added into the gradients (the layers then need not read them)."""
        self.buckets.attach()
        self.requests = [None] * len(self.buckets.buffers)
        self.missing = [0] * len(self.buckets.buffers)
        self.arrived = set()
        for p, _ in self.buckets.views:
            if not p.frozen:
                self.missing[self.place[id(p)][0]] += p.size
                p.updater = self
                if first_of_window:
                    p.grad = None

    def begin_update(self, param):
        bucket, flat = self.place[id(param)]
        self.arrived.add(id(param))

        def take(grad: np.ndarray, first: int = 0) -> None:
            target = flat[first:first + grad.size]
            if not np.shares_memory(target, grad):
                target[...] = grad
            self.missing[bucket] -= grad.size
            if self.missing[bucket] == 0:
                self._start(bucket)
            else:  # MPI progresses the reductions in flight only inside MPI calls
                self._progress()
        return take

    def _start(self, bucket: int) -> None:
        from mpi4py import MPI
        self.requests[bucket] = self.span_sums.start(self.world, bucket) if self.span_sums \
            else self.world.comm.Iallreduce(MPI.IN_PLACE, self.buckets.buffers[bucket], op=MPI.SUM)

    def _progress(self) -> None:
        from mpi4py import MPI
        started = [r for r in self.requests if r is not None]
        if started:
            MPI.Request.Testall(started)

    def finish(self, timeout: float) -> None:
        """Give every parameter its bucket view back, start the buckets backward did not complete
        (parameters it did not use) in bucket order, and wait for all reductions."""
        for p, view in self.buckets.views:
            p.updater = None
            if id(p) not in self.arrived and not p.frozen:  # unused: its accumulated gradient
                accumulator = p.grad_buffer()
                if accumulator is not view:
                    view[...] = accumulator
            p.grad = view
        for bucket, request in enumerate(self.requests):
            if request is None:
                self._start(bucket)
        wait(self.world, self.requests, timeout, "the gradient all-reduce")
        if self.span_sums is not None:
            for bucket in range(len(self.buckets.buffers)):
                self.span_sums.settle(bucket)


class OrderedSum:
    """The fixed-order sum of the module docstring: `parts_per_rank` gradient sums on this rank,
    one per piece of the global batch it owns, added across ranks in piece order."""

    def __init__(self, buckets: GradientBuckets, parts_per_rank: int):
        self.buckets = buckets
        self.parts = [[np.zeros_like(b) for b in buckets.buffers] for _ in range(parts_per_rank)]

    def keep(self, part: int, first: bool) -> None:
        """Add the gradients now in the buckets (one piece's) to the sum of this rank's `part`;
        `first`: its first micro-batch of the window (the sum starts there)."""
        self.buckets.attach()
        for kept, buffer in zip(self.parts[part], self.buckets.buffers):
            if first:
                kept[...] = buffer
            else:
                kept += buffer

    def reduce(self, world: World, timeout: float) -> None:
        """Write part 0 + part 1 + ... + part (parts - 1) of the whole global batch, added in that
        order, into the buckets of every rank."""
        buffers = self.buckets.buffers
        rank, size = world.rank, world.size
        if rank > 0:
            wait(world, [world.comm.Irecv(b, source=rank - 1, tag=i) for i, b in enumerate(buffers)],
                 timeout, f"the running gradient sum from rank {rank - 1}")
        for j, kept in enumerate(self.parts):
            for buffer, piece in zip(buffers, kept):
                if rank == 0 and j == 0:
                    buffer[...] = piece
                else:
                    buffer += piece
        if size > 1:
            if rank < size - 1:
                wait(world, [world.comm.Isend(b, dest=rank + 1, tag=i) for i, b in enumerate(buffers)],
                     timeout, f"sending the running gradient sum to rank {rank + 1}")
            wait(world, [world.comm.Ibcast(b, root=size - 1) for b in buffers], timeout,
                 f"the broadcast of the gradient sum from rank {size - 1}")


def sum_in_order(world: World, slots: np.ndarray, timeout: float) -> np.ndarray:
    """`slots` (float64, each slot written by exactly one rank, zeros elsewhere) summed over the
    ranks: exact, since every slot adds zeros to one value. The caller then adds the slots up in
    their order, the same in any N."""
    if world.size > 1:
        from mpi4py import MPI
        wait(world, [world.comm.Iallreduce(MPI.IN_PLACE, slots, op=MPI.SUM)], timeout,
             "the all-reduce of the losses")
    return slots


def broadcast_parameters(world: World, params: list, timeout: float) -> None:
    """Every rank takes rank 0's parameter values (as bytes: bfloat16 and float16 included)."""
    if world.size > 1:
        wait(world, [world.comm.Ibcast(p.data.reshape(-1).view(np.uint8), root=0) for p in params],
             timeout, "the broadcast of the parameters from rank 0")


def parameter_digest(params: list) -> np.ndarray:
    """A 32-byte BLAKE2b digest of every parameter's name, shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=32)
    for p in params:
        h.update(f"{p.name}{p.shape}{p.data.dtype}".encode())
        h.update(p.data.reshape(-1).view(np.uint8))
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def check_parameters_equal(world: World, params: list, timeout: float, when: str) -> None:
    """Raise RuntimeError naming the ranks whose parameters differ from rank 0's."""
    if world.size == 1:
        return
    mine = parameter_digest(params)
    everyone = np.empty((world.size, mine.size), dtype=np.uint8)
    wait(world, [world.comm.Iallgather(mine, everyone)], timeout, "the parameter hash exchange")
    differ = [r for r in range(world.size) if not np.array_equal(everyone[r], everyone[0])]
    if differ:
        raise RuntimeError(f"{world.describe()}: {when}: the parameters of rank(s) {differ} differ "
                           "from rank 0's (their hashes differ): the ranks have diverged")
