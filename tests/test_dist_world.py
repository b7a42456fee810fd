"""npcpu.dist in one process, without MPI: launcher detection, threads per rank, the rows each
rank serves, the refusals, and the deterministic pieces summed in one process."""

import os
import sys

import numpy as np
import pytest

from npcpu.config import build_config
from npcpu.data.loader import DataLoader
from npcpu.data.synthetic import SyntheticClassification
from npcpu.dist import DataParallelTrainer, World, init_world
from npcpu.train.build import build_run

LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "PMIX_RANK", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def no_mpi4py(monkeypatch):
    """No launcher variables, and mpi4py impossible to import."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)


def test_a_single_process_needs_no_mpi4py(no_mpi4py, monkeypatch):
    assert init_world() == World()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # srun -n 1, or a batch script: one process
    assert init_world() == World()


@pytest.mark.parametrize("variables", [{"PMI_RANK": "1", "PMI_SIZE": "2"},
                                       {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"},
                                       {"PMIX_RANK": "0"}, {"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}])
def test_a_launcher_without_mpi4py_says_how_to_install_it(no_mpi4py, monkeypatch, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ImportError, match=r"pip install 'npcpu\[mpi\]'") as error:
        init_world()
    assert next(iter(variables)) in str(error.value)


def test_threads_per_rank_divide_the_node_and_can_be_overridden():
    assert World(local_size=1).threads_per_rank(3) == 3
    for ranks in (1, 2, 64):
        threads = World(size=ranks, local_size=ranks).threads_per_rank()
        assert 1 <= threads <= max(1, os.cpu_count() // ranks)


@pytest.mark.parametrize("parts", [2, 3])
def test_the_ranks_rows_make_up_each_global_batch_in_order(parts):
    """Rows start..stop of each batch per rank, joined over the ranks: the one-process batches
    (uneven splits included: 31 rows in 3 parts, and a short last batch)."""
    data = SyntheticClassification(100, 5, 3, seed=1)
    whole = DataLoader(data, 31, seed=4, prefetch=0)
    shares = [DataLoader(data, 31, seed=4, prefetch=0,
                         rows_of_batch=lambda n, r=r: (r * n // parts, (r + 1) * n // parts))
              for r in range(parts)]
    for epoch in (0, 1):
        batches = zip(whole.iter_from(epoch, 0), *(s.iter_from(epoch, 0) for s in shares))
        for (x, y), *pieces in batches:
            np.testing.assert_array_equal(np.concatenate([px for px, _ in pieces]), x)
            np.testing.assert_array_equal(np.concatenate([py for _, py in pieces]), y)
    assert [whole.batch_size_of(b) for b in range(len(whole))] == [31, 31, 31, 7]


def tiny_config(**train):
    return build_config(overrides={
        "model": {"hidden": [16, 9], "dropout": 0.0},
        "data": {"train_size": 300, "eval_size": 100, "input_dim": 12},
        "optim": {"lookahead": False},
        "train": {"batch_size": 30, "max_steps": 4, "precision": "fp32", "threads": 1,
                  "eval_every": None, "checkpoint_every": None, **train},
        "dist": {"deterministic": True, "parts": 6}})


def test_deterministic_pieces_in_one_process_equal_the_whole_batch_to_rounding():
    """The pieces of every micro-batch, each its own backward, added in order: the parameters
    of the plain one-process run, to float32 rounding."""
    config = tiny_config()
    pieces = build_run(config, world=World())
    assert isinstance(pieces.trainer, DataParallelTrainer)
    pieces.fit(None, progress=False)
    plain = build_run(config)
    assert not isinstance(plain.trainer, DataParallelTrainer)
    plain.fit(None, progress=False)
    for a, b in zip(pieces.trainer.model.parameters(), plain.trainer.model.parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6, err_msg=a.name)


def test_a_batch_smaller_than_its_pieces_is_refused_by_name():
    run = build_run(tiny_config(batch_size=29), world=World())  # 300 = 10 * 29 + 10: last has 10
    run.config["dist"]["parts"] = 12
    run.trainer.parts = 12
    with pytest.raises(ValueError, match=r"batch 10 of an epoch has 10 samples, fewer than the "
                                         r"12 pieces \(dist.parts\)"):
        run.fit(None, progress=False)


def test_parts_must_be_a_multiple_of_the_ranks_and_updates_in_backward_are_refused():
    with pytest.raises(ValueError, match=r"dist.parts \(6\) must be a multiple of the world size \(4\)"):
        build_run(tiny_config(), world=World(size=4, local_size=4))
    config = tiny_config(update_in_backward=True, clip_grad_norm=None)
    config["freeze"]["enabled"] = False
    config["train"]["accumulation_steps"] = 1
    config["optim"]["name"] = "adamw"
    with pytest.raises(ValueError, match="update_in_backward cannot be used"):
        build_run(config, world=World())
