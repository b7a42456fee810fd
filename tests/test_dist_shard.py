"""The optimizer step sharded across the ranks (npcpu.dist.shard, `dist.shard_optimizer`): the
dealing of parameters, and runs under mpiexec that must be bitwise the runs without sharding,
their checkpoints holding the whole optimizer state (resumed on another N). Skips like
tests/test_dist_mpi.py without mpi4py or mpiexec (fails under NPCPU_REQUIRE_MPI=1)."""

import shutil

import numpy as np
import pytest
from test_dist_mpi import DETERMINISTIC, TINY, final_state, metrics, train

from npcpu.dist.shard import deal

SHARD = ["--dist.shard_optimizer", "true"]


def test_parameters_are_dealt_whole_largest_first_to_the_least_loaded_rank():
    # 10 -> 0 (loads 10, 0), 7 -> 1 (10, 7), 7 -> 1 (10, 14), 3 -> 0 (13, 14), 1 -> 0 (14, 14)
    assert deal([10, 1, 7, 3, 7], 2) == [0, 0, 1, 0, 1]
    assert deal([5, 5, 5], 3) == [0, 1, 2]
    assert deal([4, 2], 3) == [0, 1]  # a rank may own nothing
    sizes = list(np.random.default_rng(0).integers(1, 1000, 40))
    owners = deal(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(sizes)


def flat_state(state, prefix=""):
    """{"a.b.c": leaf} of a nested checkpoint state."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items()
                for k, v in flat_state(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): state}


def assert_states_equal(got: dict, want: dict, what: str) -> None:
    got, want = flat_state(got), flat_state(want)
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key].view(np.uint8), value.view(np.uint8),
                                          err_msg=f"{what}: {key}")
        elif key != "trainer.last_eval.eval_loss":  # compared through the metrics
            assert got[key] == value, f"{what}: {key}"


@pytest.mark.parametrize("freezer", ["true", "false"])
def test_a_sharded_run_is_bitwise_the_unsharded_run_and_its_checkpoints_resume_anywhere(
        mpiexec, tmp_path, freezer):
    """bf16 with stochastic rounding, LAMB inside Lookahead, dropout, clipping, evaluation on the
    slow weights every 3 steps, clipping at 0.2 (below the gradient norms), deterministic sums: 3 ranks sharded = 3 ranks not = 1 process,
    the whole checkpoint (optimizer state of every parameter, slow weights) bit for bit; the
    sharded run's step-3 checkpoint resumed on 2 ranks, sharded, ends at the same step 6. Without
    a freezer the sharded run sums the gradient norm from the owners and clips its own only."""
    options = [*TINY, *DETERMINISTIC, "--freeze.enabled", freezer, "--train.clip_grad_norm", "0.2"]
    train(mpiexec, 1, tmp_path / "one", *options)
    train(mpiexec, 3, tmp_path / "plain", *options)
    done = train(mpiexec, 3, tmp_path / "sharded", *options, *SHARD)
    assert "optimizer step sharded by parameter: rank 0 owns" in done.stderr
    want, want_metrics = final_state(tmp_path / "one"), metrics(tmp_path / "one")
    for run in ("plain", "sharded"):
        assert_states_equal(final_state(tmp_path / run), want, run)
        assert metrics(tmp_path / run) == want_metrics, run
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "sharded", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")
    train(mpiexec, 2, resumed, *SHARD, resume=True)
    assert_states_equal(final_state(resumed), want, "resumed on 2 ranks")


def test_a_sharded_fp32_run_on_two_ranks_equals_one_process(mpiexec, tmp_path):
    """The reduce-scatter to the owners through shared memory (float32 rounding), with
    accumulation."""
    options = [*TINY, "--train.precision", "fp32"]
    train(mpiexec, 1, tmp_path / "one", *options)
    train(mpiexec, 2, tmp_path / "two", *options, *SHARD)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert two["trainer"]["step"] == one["trainer"]["step"] == 6
    for name, value in flat_state(one["optimizer"]).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(flat_state(two["optimizer"])[name], value, rtol=1e-4,
                                       atol=1e-6, err_msg=name)
    for name, value in one["model"].items():
        np.testing.assert_allclose(two["model"][name], value, rtol=2e-5, atol=2e-6, err_msg=name)
