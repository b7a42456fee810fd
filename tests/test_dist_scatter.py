"""The sharded optimizer's gradients reduce-scattered to their owners through MPI's collectives
(npcpu.dist.reduce.SpanSums: between nodes; `--dist.shared_memory false` takes that path on
this machine): each rank's span of the buckets summed on that rank only, overlapped with
backward or after it. Skips like tests/test_dist_mpi.py without mpi4py or mpiexec."""

import subprocess
import sys

import numpy as np
import pytest
from test_dist_mpi import FP32, SECONDS, TINY, compare_runs, final_state, metrics, train
from test_dist_node import OVERFLOW_AT_STEP_2
from test_dist_shard import assert_states_equal

SHARD = ["--dist.shard_optimizer", "true"]
MPI_COLLECTIVES = ["--dist.shared_memory", "false"]

# The start of a script run under mpiexec: the world, and a stand-in for a Parameter with a
# float32 gradient (what the gradient buffers read of one).
STAND_IN = """
import sys
import numpy as np
from npcpu.dist.world import init_world

class Param:
    def __init__(self, size):
        self.size, self.shape, self.compute_dtype, self.grad = size, (size,), np.dtype(np.float32), None
    def grad_buffer(self):
        return self.grad if self.grad is not None else np.zeros(self.size, np.float32)

world = init_world(require_mpi=True)
"""

# Buckets of 7, 5, 7 and 4 elements; rank r's gradients are r + 1 + (element index) / 8 (exact
# in float32, and so is their sum). The spans cut inside a bucket, rank 1's (10, 10) is empty,
# and rank 2's covers the end of one bucket and the whole of the next two.
BUCKETS = STAND_IN + """
from npcpu.dist.reduce import GradientBuckets, SpanSums
params = [Param(s) for s in (4, 7, 3, 2, 7)]  # reversed in the buckets: 7 | 2 3 | 7 | 4
buckets = GradientBuckets(params, 7 * 4)
assert [b.size for b in buckets.buffers] == [7, 5, 7, 4], [b.size for b in buckets.buffers]
spans = [(0, 10), (10, 10), (10, 23)]
total = np.concatenate(buckets.buffers).size
mine = world.rank + 1 + np.arange(total, dtype=np.float32) / 8
want = sum(r + 1 + np.arange(total, dtype=np.float32) / 8 for r in range(world.size))
for buffer, start in zip(buckets.buffers, buckets.starts):
    buffer[...] = mine[start:start + buffer.size]
sums = SpanSums(buckets, spans, world.rank)
assert [sums.split(counts) for counts, _ in sums.shares] == [False, True, False, False]
sums.reduce(world, 30.0)
start, stop = spans[world.rank]
got = np.concatenate(buckets.buffers)
np.testing.assert_array_equal(got[start:stop], want[start:stop])
sums.gather(world, 30.0)
np.testing.assert_array_equal(np.concatenate(buckets.buffers), want)
sys.stdout.write(f"rank {world.rank} ok\\n")  # one write: the ranks share the output stream
sys.stdout.flush()
"""


def test_buckets_reduce_scatter_each_span_to_its_rank_and_gather_them_whole(mpiexec):
    done = subprocess.run([mpiexec, "-n", "3", sys.executable, "-c", BUCKETS],
                          capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split("\n"))[1:] == [f"rank {r} ok" for r in range(3)]


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_sharded_runs_through_mpi_reduce_scatter_and_equal_one_process(mpiexec, tmp_path,
                                                                       overlap):
    """3 ranks, 1 KB buckets (the ranks' spans cut some of them, some hold none of a rank's
    span), fp32, accumulation, clipping, a freezer that freezes: one process's run to float32
    rounding."""
    freezing = ["--freeze.threshold", "1e9", "--freeze.patience", "1", "--freeze.window", "1",
                "--freeze.start_step", "3"]
    compare_runs(tmp_path, mpiexec, 3, *TINY, *FP32, "--dist.bucket_mb", "0.001",
                 "--dist.overlap", overlap, *MPI_COLLECTIVES, *SHARD,
                 "--train.clip_grad_norm", "0.2", *freezing)
    assert any(line.get("frozen_layers") for line in metrics(tmp_path / "many"))


def test_a_sharded_bf16_run_reduce_scattered_by_mpi_is_bitwise_the_all_reduced_one(mpiexec,
                                                                                 tmp_path):
    """2 ranks (a sum of two adds them in either order to the same bits), bf16 with stochastic
    rounding, LAMB inside Lookahead, dropout, clipping below the gradient norms, evaluation on
    the slow weights, 1 KB buckets overlapped with backward: every parameter, optimizer state
    and metric bit for bit."""
    options = [*TINY, "--train.precision", "bf16", "--train.clip_grad_norm", "0.2",
               "--dist.bucket_mb", "0.001", *MPI_COLLECTIVES]
    plain = train(mpiexec, 2, tmp_path / "plain", *options)
    sharded = train(mpiexec, 2, tmp_path / "sharded", *options, *SHARD)
    assert "gradients summed by all-reduce overlapped" in plain.stdout + plain.stderr
    assert "gradients summed by reduce-scatter to the owners overlapped" \
        in sharded.stdout + sharded.stderr
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "plain"),
                        "sharded")
    assert metrics(tmp_path / "sharded") == metrics(tmp_path / "plain")


def test_an_overflow_in_a_reduce_scattered_sum_is_named_from_the_gathered_gradients(
        mpiexec, tmp_path):
    """on_nonfinite = skip (tests/test_dist_node.py's overflow at step 2), 3 ranks: the owner's
    Inf sum gathered by every rank, the layer named, the step skipped, as through shared memory.
    (After backward: the overflow is added to a gradient after the micro-batch, which an
    overlapped reduction would already have sent. On 3 ranks a missing gather fails it.)"""
    options = [*TINY, *FP32, "--train.on_nonfinite", "skip", "--dist.overlap", "false"]
    for name, extra in {"shared": SHARD, "mpi": [*SHARD, *MPI_COLLECTIVES]}.items():
        done = train(mpiexec, 3, tmp_path / name, *options, *extra, wrapper=OVERFLOW_AT_STEP_2)
        said = done.stdout + done.stderr
        assert "non-finite gradient first in layer '2' (FusedLinearReLU), parameter 2.weight; " \
            "1 of 6 gradients non-finite" in said, name
        assert final_state(tmp_path / name)["trainer"]["skipped_steps"] == 1, name
    np.testing.assert_allclose(final_state(tmp_path / "mpi")["model"]["2.weight"],
                               final_state(tmp_path / "shared")["model"]["2.weight"],
                               rtol=2e-5, atol=2e-6)
