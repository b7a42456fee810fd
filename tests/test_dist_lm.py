"""The GPT and its data sets through `npcpu train` under mpiexec, against one process: the Markov
source to float32 rounding (dropout, accumulation, an uneven split, sharded evaluation), prepared
text bitwise in deterministic mode; `npcpu eval` of such a run in one process and under mpiexec.
Skips like tests/test_dist_mpi.py without mpi4py or mpiexec (fails under NPCPU_REQUIRE_MPI=1)."""

import json
import os
import string
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_dist_mpi import SECONDS, final_state, metrics, train
from test_dist_shard import assert_states_equal

from npcpu.cli import main

# 6 steps of 2 micro-batches of 5 sequences (3 + 2 rows on 2 ranks), dropout everywhere; 150
# evaluation sequences are 3 evaluation batches (64, 64, 22), shared by the ranks
TINY_GPT = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "16",
            "--model.block_size", "12", "--model.dropout", "0.1", "--train.batch_size", "5",
            "--train.accumulation_steps", "2", "--train.max_steps", "6", "--train.eval_every", "3",
            "--train.checkpoint_every", "3", "--train.threads", "1", "--train.log_every", "1",
            "--schedule.warmup_steps", "2", "--progress", "lines"]
SYNTHETIC = ["--preset", "gpt-synthetic", "--data.eval_size", "150", *TINY_GPT]


def test_gpt_on_synthetic_text_on_two_ranks_equals_one_process(mpiexec, tmp_path):
    """And the same 2-rank run with the optimizer step sharded: bitwise the unsharded one (its
    final checkpoint, AdamW's moments of every parameter included)."""
    train(mpiexec, 1, tmp_path / "one", *SYNTHETIC)
    done = train(mpiexec, 2, tmp_path / "two", *SYNTHETIC)
    train(mpiexec, 2, tmp_path / "sharded", *SYNTHETIC, "--dist.shard_optimizer", "true")
    assert_states_equal(final_state(tmp_path / "sharded"), final_state(tmp_path / "two"),
                        "sharded")
    assert "data-parallel language-model step" in done.stderr and "tokens/s" in done.stderr
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["trainer"]["samples_seen"] == 6 * 10 * 12  # tokens: steps x sequences x positions
    for key, value in one["trainer"].items():
        assert key == "last_eval" or two["trainer"][key] == value, key
    for name, value in one["model"].items():
        np.testing.assert_allclose(two["model"][name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    one_metrics, two_metrics = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["kind"] for m in one_metrics].count("eval") == 2
    for got, want in zip(two_metrics, one_metrics, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key == "tokens_per_s":
                continue
            assert got[key] == (pytest.approx(value, rel=1e-4, abs=1e-6)
                                if isinstance(value, float) else value), key


def test_npcpu_eval_of_a_two_rank_run_in_one_process_and_under_mpiexec(mpiexec, tmp_path):
    """The same numbers as the run's final evaluation, printed once, with 1, 2 or 3 processes
    (3 evaluation batches: rank 2 of 3 takes the last)."""
    run_dir = tmp_path / "run"
    train(mpiexec, 2, run_dir, *SYNTHETIC)
    final = [m for m in metrics(run_dir) if m["kind"] == "eval"][-1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for ranks in (1, 2, 3):
        program = [sys.executable, "-m", "npcpu", "eval", str(run_dir), "--threads", "1"]
        command = program if ranks == 1 else [mpiexec, "-n", str(ranks), *program]
        done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert len(lines) == 1 and "(step 6)" in lines[0], (ranks, done.stdout)
        words = lines[0].split(": eval ")[1].split()  # "loss 2.7409  perplexity 15.5002 ..."
        printed = dict(zip(words[::2], map(float, words[1::2])))
        assert printed["loss"] == pytest.approx(final["eval_loss"], abs=1e-4), ranks
        assert printed["perplexity"] == pytest.approx(final["eval_perplexity"], abs=1e-4), ranks


def test_gpt_on_prepared_text_deterministic_is_bitwise_the_same_on_one_and_two_ranks(
        mpiexec, tmp_path):
    """A char-level text directory, bf16 storage (stochastic rounding), dropout: every parameter
    and every metric bit for bit."""
    data_dir = tmp_path / "data"
    assert main(["prepare-text", textwrap.__file__, string.__file__, "--out", str(data_dir),
                 "--tokenizer", "char"]) == 0
    options = ["--preset", "gpt-char", "--data.path", str(data_dir), *TINY_GPT,
               "--train.batch_size", "6", "--train.precision", "bf16",
               "--dist.deterministic", "true", "--dist.parts", "6"]
    runs = {}
    for ranks in (1, 2):
        train(mpiexec, ranks, tmp_path / str(ranks), *options)
        runs[ranks] = final_state(tmp_path / str(ranks)), metrics(tmp_path / str(ranks))
        assert json.loads((tmp_path / str(ranks) / "tokenizer.json").read_text())
    (one_state, one_metrics), (two_state, two_metrics) = runs[1], runs[2]
    assert one_state["trainer"]["step"] == 6
    for name, value in one_state["model"].items():
        np.testing.assert_array_equal(two_state["model"][name].view(np.uint16),
                                      value.view(np.uint16), err_msg=name)
    for line in (*one_metrics, *two_metrics):
        line.pop("tokens_per_s", None)
    assert two_metrics == one_metrics
