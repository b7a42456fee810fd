"""Exact resume of a language-model run through a real SIGKILL (the machinery of test_resume)."""

import signal

from npcpu.train.build import load_run_config
from statecheck import assert_same_state
from test_resume import final_state, run, start, train_history, wait_for_checkpoint


def test_killed_and_resumed_language_model_run_is_bitwise_the_uninterrupted_one(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    result = run(uninterrupted, "--lm")
    assert result.returncode == 0, result.stderr
    assert load_run_config(uninterrupted)["model"]["kind"] == "gpt"
    assert "tokens/s" in result.stderr

    killed = tmp_path / "killed"
    process = start(killed, "--lm", "--sleep", "0.1")
    wait_for_checkpoint(killed, 12, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = run(killed, "--lm", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert train_history(killed) == train_history(uninterrupted)
    assert_same_state(final_state(killed), final_state(uninterrupted))
