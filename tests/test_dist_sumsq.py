"""The ranks' gradient sum and the gradient norm's sums of squares in one pass
(npcpu.kernels.grads.sum_ranks_and_square_chunks, used by npcpu.dist.node.SharedMemorySum when
the optimizer is sharded): the kernel against its NumPy twin and bit for bit against
chunk_power_sums, each rank's chunks (npcpu.dist.shard.own_chunks), and runs under mpiexec whose
gradient norms are the unsharded runs' bit for bit and one process's to float32 rounding. The
runs skip like tests/test_dist_mpi.py without mpi4py or mpiexec."""

import subprocess
import sys

import numpy as np
import pytest
from test_dist_mpi import FP32, SECONDS, TINY, final_state, metrics, train
from test_dist_scatter import STAND_IN
from test_dist_shard import assert_states_equal

from npcpu.dist.shard import SPLIT_UNIT, cuts, own_chunks, pieces
from npcpu.kernels.grads import CHUNK, LANES, chunk_power_sums, sum_ranks_and_square_chunks

SHARD = ["--dist.shard_optimizer", "true"]

# Parameter pieces laid end to end: four whole chunks and more (the side-by-side path), a piece
# of one element, pieces that end in a part of a chunk, and one of exactly one chunk.
PIECES = [LANES * CHUNK + 17, 1, 3 * CHUNK, CHUNK, 2 * CHUNK + 5, (LANES + 1) * CHUNK]


def chunk_table(sizes: list[int], start: int) -> np.ndarray:
    """Where each chunk of pieces of `sizes` laid end to end from `start` begins, then the end."""
    starts = [start]
    for size in sizes:
        first = starts[-1]
        starts.extend(range(first + CHUNK, first + size, CHUNK))
        starts.append(first + size)
    return np.array(starts, dtype=np.int64)


def sum_ranks_twin(sources: list[np.ndarray], starts: np.ndarray):
    """(the sum, in rank order with rounding after each addition; each chunk's sum of the float64
    squares of that sum, added one after the other in index order)."""
    total = sources[0].copy()
    for source in sources[1:]:
        total += source
    squares = total.astype(np.float64) ** 2
    partials = [np.add.accumulate(squares[a:b])[-1] for a, b in zip(starts[:-1], starts[1:])]
    return total, np.array(partials)


def test_the_chunk_table_cuts_each_piece_from_its_first_element():
    starts = chunk_table([2 * CHUNK + 3, 5, CHUNK], 7)
    assert starts.tolist() == [7, 7 + CHUNK, 7 + 2 * CHUNK, 7 + 2 * CHUNK + 3,
                               7 + 2 * CHUNK + 8, 7 + 3 * CHUNK + 8]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ranks", [2, 3])
def test_the_sum_and_its_chunks_squares_are_the_twins_and_chunk_power_sums_bit_for_bit(
        num_threads, dtype, ranks):
    rng = np.random.default_rng(ranks)
    before = 9  # elements of the buffer before this rank's range, and after it
    starts = chunk_table(PIECES, before)
    size = int(starts[-1]) + before
    sources = [(rng.standard_normal(size) * 10.0 ** rng.integers(-6, 6, size)).astype(dtype)
               for _ in range(ranks)]
    sources[1][before + 3 * CHUNK + 2] = np.inf  # a non-finite chunk, in the side-by-side path
    sources[0][starts[-2] + 1] = np.nan
    want, want_partials = sum_ranks_twin(sources, starts)
    outside = np.r_[0:before, size - before:size]
    for into in (0, ranks - 1, None):  # the sum over one of its sources, or into another array
        copies = [s.copy() for s in sources]
        out = copies[into] if into is not None else np.full(size, 7, dtype)
        kept = out[outside].copy()
        partials = np.full(starts.size - 1, -1.0)
        sum_ranks_and_square_chunks(tuple(copies), out, starts, partials)
        inside = slice(before, size - before)
        np.testing.assert_array_equal(out[inside], want[inside])
        np.testing.assert_array_equal(out[outside], kept)
        np.testing.assert_array_equal(partials, want_partials)
        piece_partials, offset = [], before
        for piece in PIECES:
            mine = np.zeros(-(-piece // CHUNK))
            chunk_power_sums(want[offset:offset + piece].copy(), 2.0, mine)
            piece_partials.append(mine)
            offset += piece
        assert np.array_equal(partials, np.concatenate(piece_partials), equal_nan=True)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_each_ranks_chunks_tile_its_range_piece_by_piece(ranks):
    class Param:
        def __init__(self, size):
            self.size = size

    in_buffer = [Param(s) for s in (3 * SPLIT_UNIT + 5, 1, 0, 7 * SPLIT_UNIT, 2 * CHUNK - 1)]
    sizes = [p.size for p in in_buffer]
    offsets = cuts(sizes, ranks)
    owned = {id(p): own for p, own in zip(in_buffer, pieces(sizes, offsets))}
    buffer_starts = np.concatenate([[0], np.cumsum(sizes)])
    for rank in range(ranks):
        starts, first_chunk = own_chunks(in_buffer, owned, offsets[rank], rank)
        assert (starts[0], starts[-1]) == (offsets[rank], offsets[rank + 1])
        want = [offsets[rank]]
        for k, p in enumerate(in_buffer):
            for owner, first, stop in owned[id(p)]:
                if owner == rank and stop > first:
                    assert first_chunk[id(p)] == len(want) - 1
                    want.extend(buffer_starts[k] + np.minimum(
                        np.arange(first + CHUNK, stop + CHUNK, CHUNK), stop))
        assert starts.tolist() == want
        assert set(first_chunk) == {id(p) for p in in_buffer
                                    if any(o == rank and b > a for o, a, b in owned[id(p)])}


# Parameters of odd sizes, the first cut between the ranks; every rank's summed range and its
# chunks' sums of squares checked against add-then-chunk_power_sums.
SHARED_SUM = STAND_IN + """
from npcpu.dist.node import SharedMemorySum
from npcpu.dist.shard import cuts, own_chunks, pieces
from npcpu.kernels.grads import CHUNK, chunk_power_sums
params = [Param(s) for s in (5 * CHUNK + 3, 1, 4 * CHUNK, 9 * CHUNK + 11)]
in_buffer = params[::-1]
sizes = [p.size for p in in_buffer]
offsets = cuts(sizes, world.size)
owned = {id(p): own for p, own in zip(in_buffer, pieces(sizes, offsets))}
starts, first_chunk = own_chunks(in_buffer, owned, offsets[world.rank], world.rank)
spans = list(zip(offsets[:-1], offsets[1:]))
node_sum = SharedMemorySum(world, params, spans, 30.0, starts)
for step in range(2):
    grads = [np.random.default_rng([step, r]).standard_normal(sum(sizes)).astype(np.float32)
             for r in range(world.size)]
    for p, view in node_sum.buckets.views:
        p.grad = view
    offset = 0
    for p in in_buffer:
        p.grad[...] = grads[world.rank][offset:offset + p.size]
        offset += p.size
    partials = node_sum.reduce_scatter(squares=True)
    want = grads[0].copy()
    for g in grads[1:]:
        want += g
    start, stop = spans[world.rank]
    got = node_sum.arrays[world.rank]
    np.testing.assert_array_equal(got[start:stop], want[start:stop])
    offset, checked = 0, 0
    for p in in_buffer:
        for owner, first, stop in owned[id(p)]:
            if owner == world.rank and stop > first:
                mine = np.zeros(-(-(stop - first) // CHUNK))
                chunk_power_sums(want[offset + first:offset + stop].copy(), 2.0, mine)
                c = first_chunk[id(p)]
                np.testing.assert_array_equal(partials[c:c + mine.size], mine)
                checked += mine.size
        offset += p.size
    assert checked == partials.size == starts.size - 1, (checked, partials.size)
    node_sum.reduce_scatter()  # without squares: add_ranks, for the next step's check
sys.stdout.write(f"rank {world.rank} ok\\n")
sys.stdout.flush()
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_owner_sums_its_range_and_its_chunks_squares_through_shared_memory(mpiexec,
                                                                                 ranks):
    done = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-c", SHARED_SUM],
                          capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split("\n"))[1:] == [f"rank {r} ok" for r in range(ranks)]


# A first weight of 300 x 700 = 210000 elements (12 whole chunks and a part): each owner's
# range holds runs of whole chunks, summed side by side.
WIDER = ["--data.input_dim", "300", "--model.hidden", "700,9"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_gradient_norms_of_a_sharded_run_are_the_unsharded_and_one_process_norms(
        mpiexec, tmp_path, ranks):
    """Clipping below the gradient norms (the norm scales every gradient), fp32, a freezer that
    freezes: the sharded run's norms, taken in the pass that sums the gradients, are the
    unsharded run's bit for bit (and its parameters too) and one process's to float32
    rounding."""
    options = [*TINY, *WIDER, *FP32, "--train.clip_grad_norm", "0.1",
               "--freeze.threshold", "1e9", "--freeze.patience", "2", "--freeze.window", "2",
               "--freeze.start_step", "4"]
    train(mpiexec, 1, tmp_path / "one", *options)
    train(mpiexec, ranks, tmp_path / "plain", *options)
    train(mpiexec, ranks, tmp_path / "sharded", *options, *SHARD)
    norms = {name: [line["grad_norm"] for line in metrics(tmp_path / name) if "grad_norm" in line]
             for name in ("one", "plain", "sharded")}
    assert len(norms["one"]) == 6 and all(norm > 0.1 for norm in norms["one"]), norms["one"]
    assert norms["sharded"] == norms["plain"]
    np.testing.assert_allclose(norms["sharded"], norms["one"], rtol=1e-5)
    assert final_state(tmp_path / "plain")["freezer"]["frozen_at"] != {}
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "plain"),
                        "sharded")
