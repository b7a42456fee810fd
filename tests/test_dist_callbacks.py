"""Callbacks in a data-parallel run: on_checkpoint is called on every rank with the path rank 0
wrote, so a callback that stops the run there stops every rank (were it called on rank 0 only,
the others would train on and time out waiting for it). Skips like tests/test_dist_mpi.py without
mpi4py or mpiexec (fails under NPCPU_REQUIRE_MPI=1)."""

import subprocess
import sys

from test_dist_mpi import SECONDS

# Each rank trains the tiny MLP with a callback that stops training at its first checkpoint
# (step 3 of 6) and writes what it saw to its own file (mpiexec forwards the ranks' standard
# outputs concurrently, and their lines can arrive spliced).
STOP_AT_CHECKPOINT = """
import sys
from npcpu import backend
from npcpu.config import build_config
from npcpu.dist import init_world
from npcpu.train.build import build_run
from npcpu.train.callbacks import Callback

class StopAtCheckpoint(Callback):
    def on_checkpoint(self, trainer, path):
        self.seen = path
        trainer.stop_training = True

backend.set_threads(1)
world = init_world()
stop = StopAtCheckpoint()
config = build_config(overrides={
    "model": {"hidden": [16, 9]}, "data": {"train_size": 300, "eval_size": 100, "input_dim": 12},
    "train": {"batch_size": 30, "max_steps": 6, "checkpoint_every": 3, "eval_every": None},
    "dist": {"timeout": 10.0}})
run = build_run(config, callbacks=[stop], world=world)
run.fit(sys.argv[1] + "/run", progress=False)
with open(f"{sys.argv[1]}/rank-{world.rank}.txt", "w") as seen:
    seen.write(f"step {run.trainer.step}, checkpoint {stop.seen}")
"""


def test_a_callback_that_stops_at_a_checkpoint_stops_every_rank(mpiexec, tmp_path):
    done = subprocess.run([mpiexec, "-n", "3", sys.executable, "-c", STOP_AT_CHECKPOINT,
                           str(tmp_path)], capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    written = tmp_path / "run" / "checkpoints" / "step-000003"
    for rank in range(3):
        assert (tmp_path / f"rank-{rank}.txt").read_text() == f"step 3, checkpoint {written}", rank
