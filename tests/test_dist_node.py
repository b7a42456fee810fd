"""Gradients summed through a node's shared memory (npcpu.dist.node): the sum's order and the
ranks' ranges, and runs under mpiexec (ranks oversubscribed on this machine) that must equal
the runs through MPI's collectives, and sharded runs (each owner alone summing its gradients)
that must be bitwise the unsharded ones. Skips like tests/test_dist_mpi.py without mpi4py or
mpiexec (fails under NPCPU_REQUIRE_MPI=1)."""

import subprocess
import sys

import numpy as np
import pytest
from test_dist_mpi import FP32, SECONDS, TINY, final_state, metrics, train
from test_dist_shard import assert_states_equal

from npcpu.dist.node import add_ranks, even_spans

SHARD = ["--dist.shard_optimizer", "true"]
MPI_COLLECTIVES = ["--dist.shared_memory", "false"]


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("size,chunk", [(1, 1), (1001, 64), (1001, 1001), (37, 4096)])
def test_add_ranks_adds_in_rank_order_chunk_by_chunk(ranks, size, chunk):
    rng = np.random.default_rng(size + ranks)
    sources = [(rng.standard_normal(size) * 10.0 ** rng.integers(-8, 8, size)).astype(np.float32)
               for _ in range(ranks)]
    want = sources[0].copy()
    for source in sources[1:]:
        want += source  # ((s0 + s1) + s2) + ...: float32 rounding after each addition
    out = np.empty(size, np.float32)
    add_ranks(sources, out, np.empty(chunk, np.float32))
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    for into in (0, ranks - 1):  # the sum written over one of its own sources
        copies = [s.copy() for s in sources]
        add_ranks(copies, copies[into], np.empty(chunk, np.float32))
        np.testing.assert_array_equal(copies[into].view(np.uint32), want.view(np.uint32))


def test_unsharded_ranges_are_near_equal_pieces_of_the_buffer():
    assert even_spans(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_spans(4, 3) == [(0, 1), (1, 2), (2, 4)]
    assert even_spans(0, 2) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("ranks", [2, 3])
def test_shared_memory_and_mpi_collectives_equal_one_process(mpiexec, tmp_path, ranks):
    """fp32, batch 31 split unevenly, a freezer that freezes during the run, clipping: the sum
    through shared memory, sharded or not, and through MPI's all-reduce, each equal to one
    process to float32 rounding; sharded (each owner summing its own gradients) bitwise the
    unsharded sum through shared memory."""
    options = [*TINY, *FP32, "--train.batch_size", "31", "--train.clip_grad_norm", "0.2",
               "--freeze.threshold", "1e9", "--freeze.patience", "1", "--freeze.window", "1",
               "--freeze.start_step", "3"]
    train(mpiexec, 1, tmp_path / "one", *options)
    one = final_state(tmp_path / "one")
    runs = {"shared": [], "sharded": SHARD, "mpi": MPI_COLLECTIVES}
    for name, extra in runs.items():
        done = train(mpiexec, ranks, tmp_path / name, *options, *extra)
        how = "this node's shared memory" if name != "mpi" else "all-reduce"
        assert f"gradients summed by {how}" in done.stdout + done.stderr, name
        state = final_state(tmp_path / name)
        assert state["trainer"]["step"] == one["trainer"]["step"] == 6
        assert state["freezer"]["frozen_at"] == one["freezer"]["frozen_at"] != {}
        for key, value in one["model"].items():
            np.testing.assert_allclose(state["model"][key], value, rtol=2e-5, atol=2e-6,
                                       err_msg=f"{ranks} ranks, {name}: {key}")
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "shared"),
                        "sharded")
    assert metrics(tmp_path / "sharded") == metrics(tmp_path / "shared")


def test_a_sharded_bf16_run_summed_by_its_owners_is_bitwise_the_unsharded_run(mpiexec,
                                                                                tmp_path):
    """3 ranks, bf16 with stochastic rounding, LAMB inside Lookahead, dropout, clipping below
    the gradient norms, a freezer that freezes, evaluation on the slow weights: every parameter,
    optimizer state and metric bit for bit."""
    options = [*TINY, "--train.precision", "bf16", "--train.clip_grad_norm", "0.2",
               "--freeze.threshold", "1e9", "--freeze.patience", "2", "--freeze.window", "2",
               "--freeze.start_step", "4"]
    train(mpiexec, 3, tmp_path / "plain", *options)
    train(mpiexec, 3, tmp_path / "sharded", *options, *SHARD)
    assert final_state(tmp_path / "plain")["freezer"]["frozen_at"] != {}
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "plain"),
                        "sharded")
    assert metrics(tmp_path / "sharded") == metrics(tmp_path / "plain")


# Every rank adds 3e38 to one gradient entry of layer 2 at step 2: finite on each rank, Inf once
# summed. (Rank 1 owns 2.weight when sharded on 2 ranks: rank 0 must gather it to name it.)
OVERFLOW_AT_STEP_2 = """
import sys
from npcpu.train.runners import ReferenceRunner
plain, calls = ReferenceRunner.micro_batch, []
def overflowing(self, *args):
    loss = plain(self, *args)
    calls.append(1)
    if len(calls) == 4:  # the second micro-batch of step 2
        grad = [p for p in self.trainer.model.parameters() if p.name == "2.weight"][0]
        grad.grad_buffer().reshape(-1)[5] += 3e38
    return loss
ReferenceRunner.micro_batch = overflowing
from npcpu.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_gradient_that_overflows_in_the_sum_is_named_and_skipped_alike(mpiexec, tmp_path):
    """on_nonfinite = skip: the step is skipped on every rank and the message names the layer
    whose summed gradient is Inf, sharded (the owner's sum gathered for the message) or not."""
    options = [*TINY, *FP32, "--train.on_nonfinite", "skip"]
    for name, extra in {"shared": [], "sharded": SHARD}.items():
        done = train(mpiexec, 2, tmp_path / name, *options, *extra, wrapper=OVERFLOW_AT_STEP_2)
        said = done.stdout + done.stderr
        assert "at step 2 (epoch 0) with a finite loss" in said, name
        assert "non-finite gradient first in layer '2' (FusedLinearReLU), parameter 2.weight; " \
            "1 of 6 gradients non-finite" in said, name
        assert final_state(tmp_path / name)["trainer"]["skipped_steps"] == 1, name
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "shared"),
                        "sharded")


# A first weight of 200 x 300 = 60000 elements, most of the model: the ranks' ranges cut it
# (at multiples of npcpu.dist.shard.SPLIT_UNIT) on 2 ranks in two, on 3 ranks in three.
WIDE = ["--data.input_dim", "200", "--model.hidden", "300,9"]


@pytest.mark.parametrize("ranks,split", [(2, 2), (3, 3)])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_run_whose_parameters_are_split_between_owners_is_bitwise_the_unsharded_run(
        mpiexec, tmp_path, ranks, split, precision):
    """A weight split between ranks: each owner runs LAMB's first pass on its range, the norms
    for the trust ratio come from all the owners' block sums, the gradient norm (clipping below
    the norms) and the freezer's layer norms from their chunk sums, Lookahead syncs each range;
    with bf16 stochastic rounding, dropout and evaluation on the slow weights, every parameter,
    optimizer state and metric bit for bit the unsharded run's."""
    options = [*TINY, *WIDE, "--train.precision", precision, "--train.clip_grad_norm", "0.2",
               "--freeze.threshold", "1e9", "--freeze.patience", "2", "--freeze.window", "2",
               "--freeze.start_step", "4"]
    train(mpiexec, ranks, tmp_path / "plain", *options)
    done = train(mpiexec, ranks, tmp_path / "sharded", *options, *SHARD)
    assert "(1 split between ranks; " in done.stdout + done.stderr
    state = final_state(tmp_path / "plain")
    assert state["freezer"]["frozen_at"] != {}
    assert state["model"]["0.weight"].size == 60000
    assert_states_equal(final_state(tmp_path / "sharded"), state, "sharded")
    assert metrics(tmp_path / "sharded") == metrics(tmp_path / "plain")


def test_an_elementwise_optimizer_split_between_owners_is_bitwise_the_unsharded_run(mpiexec,
                                                                                   tmp_path):
    """AdamW (no sum over a tensor: each owner updates its range alone), bf16, 3 ranks."""
    options = [*TINY, *WIDE, "--train.precision", "bf16", "--optim.name", "adamw",
               "--train.clip_grad_norm", "0.2"]
    train(mpiexec, 3, tmp_path / "plain", *options)
    done = train(mpiexec, 3, tmp_path / "sharded", *options, *SHARD)
    assert "(1 split between ranks; " in done.stdout + done.stderr
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "plain"),
                        "sharded")


# Two sharded fits in one process, of models of the same size: the second reuses the windows.
TWO_FITS = """
import sys
import numpy as np
from npcpu import backend
from npcpu.config import build_config
from npcpu.dist import init_world
from npcpu.train.build import build_run

backend.set_threads(1)
world = init_world()
runs = []
for seed in (1, 2):
    config = build_config(overrides={
        "model": {"hidden": [16, 9]}, "data": {"train_size": 300, "eval_size": 100,
                                              "input_dim": 12},
        "train": {"batch_size": 30, "max_steps": 3, "eval_every": None, "checkpoint_every": None,
                  "seed": seed},
        "dist": {"timeout": 10.0, "shard_optimizer": True}})
    runs.append(build_run(config, world=world))
runs[0].fit(None, progress=False)
first = [p.data.copy() for p in runs[0].trainer.model.parameters()]
runs[1].fit(None, progress=False)
same = all(np.array_equal(p.data.view(np.uint8), kept.view(np.uint8))
           for p, kept in zip(runs[0].trainer.model.parameters(), first))
with open(f"{sys.argv[1]}/rank-{world.rank}.txt", "w") as out:
    out.write(f"first model unchanged: {same}")
"""


def test_a_second_sharded_fit_leaves_the_first_models_parameters_alone(mpiexec, tmp_path):
    """The parameters leave the shared window at the end of a fit (SharedParameters.detach): a
    later fit of a model of the same size, which reuses the window, does not write into them."""
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", TWO_FITS, str(tmp_path)],
                          capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        assert (tmp_path / f"rank-{rank}.txt").read_text() == "first model unchanged: True"
