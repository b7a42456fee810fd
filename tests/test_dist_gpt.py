"""A tiny GPT (tied embedding, dropout in embeddings, attention and residuals) trained data-parallel
under mpiexec, against one process: to float32 rounding, and bitwise in deterministic mode.
Skips like tests/test_dist_mpi.py without mpi4py or mpiexec (fails under NPCPU_REQUIRE_MPI=1)."""

import subprocess
import sys

import numpy as np

SECONDS = 120  # a hung run fails the test instead of hanging it

# Trains the GPT for 4 steps of 2 micro-batches of 12 sequences; rank 0 saves the parameters
# (as raw bytes) and the losses to argv[1]. argv[2]: "deterministic" or "all-reduce".
TRAIN_GPT = """
import sys
import numpy as np
from npcpu import backend
from npcpu.dist import DataParallelTrainer, init_world
from npcpu.models.gpt import GPT, GPTConfig
from npcpu.nn import CrossEntropyLoss
from npcpu.optim.adam import AdamW
from npcpu.train.callbacks import Callback
from npcpu.train.trainer import Trainer

class Windows:
    def __init__(self, tokens):
        self.tokens = tokens
    def __len__(self):
        return len(self.tokens)
    def batch(self, indices):
        rows = self.tokens[indices]
        return rows[:, :-1], rows[:, 1:]

class Losses(Callback):
    def __init__(self):
        self.losses = []
    def on_step_end(self, trainer, metrics):
        self.losses.append(metrics["loss"])

out, mode = sys.argv[1], sys.argv[2]
backend.set_threads(1)
world = init_world()
deterministic = mode == "deterministic"
tokens = np.random.default_rng(0).integers(0, 37, (60, 12))
model = GPT(GPTConfig(vocab_size=37, block_size=11, n_layer=2, n_head=3, n_embd=12,
                      dropout=0.1), seed=1)
optimizer = AdamW(model.parameters(), lr=3e-3, seed=2)
losses = Losses()
options = dict(accumulation_steps=2, precision="bf16" if deterministic else "fp32",
               clip_grad_norm=1.0, callbacks=[losses], seed=5, compiled="off")
if world.size > 1 or deterministic:
    trainer = DataParallelTrainer(model, CrossEntropyLoss(), optimizer, world=world,
                                  deterministic=deterministic, parts=4, bucket_mb=0.002,
                                  **options)
else:
    trainer = Trainer(model, CrossEntropyLoss(), optimizer, **options)
result = trainer.fit(Windows(tokens), max_steps=4, batch_size=12, eval_data=Windows(tokens[:40]),
                     progress=False)
if world.rank == 0:
    arrays = {p.name: p.data.view(np.uint8).copy() if deterministic else p.data
              for p in model.parameters()}
    np.savez(out, losses=np.array(losses.losses), eval_loss=result["eval_loss"], **arrays)
"""


def train_gpt(mpiexec, ranks: int, out, mode: str) -> dict:
    program = [sys.executable, "-c", TRAIN_GPT, str(out), mode]
    command = program if ranks == 1 else [mpiexec, "-n", str(ranks), *program]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as saved:
        return dict(saved)


def test_tiny_gpt_on_two_ranks_equals_one_process(mpiexec, tmp_path):
    one = train_gpt(mpiexec, 1, tmp_path / "one.npz", "all-reduce")
    two = train_gpt(mpiexec, 2, tmp_path / "two.npz", "all-reduce")
    assert len(two["losses"]) == len(one["losses"]) == 4
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_tiny_gpt_deterministic_mode_is_bitwise_the_same_on_one_two_and_four_ranks(
        mpiexec, tmp_path):
    one = train_gpt(mpiexec, 1, tmp_path / "one.npz", "deterministic")
    for ranks in (2, 4):
        many = train_gpt(mpiexec, ranks, tmp_path / f"{ranks}.npz", "deterministic")
        for name, value in one.items():
            np.testing.assert_array_equal(many[name], value, err_msg=f"{ranks} ranks: {name}")

