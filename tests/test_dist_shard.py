"""The optimizer step sharded across the ranks (npcpu.dist.shard, `dist.shard_optimizer`): the
ranks' ranges of the parameters, and runs under mpiexec that must be bitwise the runs without sharding,
their checkpoints holding the whole optimizer state (resumed on another N). Skips like
tests/test_dist_mpi.py without mpi4py or mpiexec (fails under NPCPU_REQUIRE_MPI=1)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_dist_mpi import DETERMINISTIC, TINY, final_state, metrics, train

from npcpu.dist.shard import SPLIT_UNIT, cuts, pieces
from npcpu.kernels.grads import CHUNK
from npcpu.kernels.optim_io import BLOCK

SHARD = ["--dist.shard_optimizer", "true"]


def test_the_ranks_ranges_are_near_equal_and_cut_parameters_only_at_multiples_of_the_unit():
    # laid end to end: [0, 10) [10, 13) [13, 20); the even share of 2 ranks is 10
    assert cuts([10, 3, 7], 2, unit=4) == [0, 10, 20]  # 10 is an edge
    assert pieces([10, 3, 7], [0, 10, 20]) == [[(0, 0, 10)], [(1, 0, 3)], [(1, 0, 7)]]
    assert cuts([20], 2, unit=4) == [0, 8, 20]  # 10 lies between 8 and 12: the lower
    assert pieces([20], [0, 8, 20]) == [[(0, 0, 8), (1, 8, 20)]]
    assert cuts([13, 13], 3, unit=4) == [0, 8, 17, 26]  # 8 = 0 + 2 * 4; 17 = 13 + 4
    assert pieces([13, 13], [0, 8, 17, 26]) == [[(0, 0, 8), (1, 8, 13)], [(1, 0, 4), (2, 4, 13)]]
    assert cuts([4], 3, unit=4) == [0, 0, 0, 4]  # 1 and 2 nearer 0 than 4: ranks owning nothing
    assert pieces([4, 0], [0, 0, 0, 4]) == [[(2, 0, 4)], [(0, 0, 0)]]  # an empty parameter: rank 0
    rng = np.random.default_rng(0)
    for ranks in (2, 3, 5):
        sizes = rng.integers(1, 5 * SPLIT_UNIT, 30).tolist()
        offsets = cuts(sizes, ranks)
        total = sum(sizes)
        for r in range(1, ranks):  # within half a unit of the even share
            assert abs(offsets[r] - r * total // ranks) <= SPLIT_UNIT // 2
        for size, own in zip(sizes, pieces(sizes, offsets)):
            assert own[0][1] == 0 and own[-1][2] == size  # the pieces cover the parameter
            for (_, _, stop), (_, first, _) in zip(own, own[1:]):
                assert stop == first and first % SPLIT_UNIT == 0


def test_the_split_unit_is_a_multiple_of_every_chunk_a_sum_over_a_tensor_uses():
    assert SPLIT_UNIT % CHUNK == 0 and SPLIT_UNIT % BLOCK == 0


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
    assert_states_equal(resume_from_step_3_on_two_ranks(mpiexec, tmp_path / "sharded"), want,
                        "resumed on 2 ranks")


def resume_from_step_3_on_two_ranks(mpiexec, run: Path) -> dict:
    """A copy of `run` resumed on 2 sharded ranks from its step-3 checkpoint (the step-6 one
    removed); its final state."""
    resumed = run.parent / f"{run.name}-resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")
    train(mpiexec, 2, resumed, *SHARD, resume=True)
    return final_state(resumed)


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


def test_split_parameters_through_mpi_are_bitwise_one_process_and_resume_on_another_n(
        mpiexec, tmp_path):
    """Deterministic sums (the MPI path: pieces broadcast by their owners): a weight split in
    three on 3 ranks, then resumed from its step-3 checkpoint on 2 ranks (split in two), ends
    bit for bit where one process does, the gathered optimizer state included."""
    wide = ["--data.input_dim", "200", "--model.hidden", "300,9"]  # tests/test_dist_node.WIDE
    options = [*TINY, *wide, *DETERMINISTIC, "--train.clip_grad_norm", "0.2"]
    train(mpiexec, 1, tmp_path / "one", *options)
    done = train(mpiexec, 3, tmp_path / "sharded", *options, *SHARD)
    assert "(1 split between ranks; " in done.stderr
    want = final_state(tmp_path / "one")
    assert_states_equal(final_state(tmp_path / "sharded"), want, "sharded")
    assert metrics(tmp_path / "sharded") == metrics(tmp_path / "one")
    assert_states_equal(resume_from_step_3_on_two_ranks(mpiexec, tmp_path / "sharded"), want,
                        "resumed on 2 ranks")
