"""A damaged newest checkpoint: resume and eval fall back to the newest valid one, naming each
checkpoint skipped and why; a damaged checkpoint is never loaded, and none valid is an error."""

import json
from pathlib import Path

import numpy as np
import pytest

from npcpu.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint,
                              load_newest_valid, save_checkpoint)
from npcpu.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


# each kind of damage, and a piece of the error it must give
DAMAGE = {
    "tensors byte changed": (lambda d: flip_byte(d / "tensors.safetensors"), "SHA-256 mismatch"),
    "tensors truncated": (lambda d: truncate(d / "tensors.safetensors"), "SHA-256 mismatch"),
    "tensors missing": (lambda d: (d / "tensors.safetensors").unlink(),
                        "tensors.safetensors: missing"),
    "state.json missing": (lambda d: (d / "state.json").unlink(), "state.json: missing"),
    "state.json truncated": (lambda d: truncate(d / "state.json"), "state.json: not valid JSON"),
    "state.json hash changed": (lambda d: (d / "state.json").write_text(
        (d / "state.json").read_text().replace('"tensors_sha256": "', '"tensors_sha256": "0')),
        "SHA-256 mismatch"),
}


def three_checkpoints(run_dir: Path) -> list[Path]:
    return [save_checkpoint(run_dir, {"w": np.full(3, step, np.float32)}, step=step)
            for step in (1, 2, 3)]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_is_skipped_with_its_error_named(tmp_path, kind):
    damage, error = DAMAGE[kind]
    *_, newest = three_checkpoints(tmp_path)
    damage(newest)
    with pytest.warns(RuntimeWarning, match=f"skipped the damaged checkpoint step-000003: .*{error}"):
        state, info = load_newest_valid(tmp_path)
    assert info["step"] == 2 and state["w"][0] == 2 and info["fallback"]
    assert [(p.name, error in e) for p, e in info["skipped"]] == [("step-000003", True)]


def test_valid_newest_loads_without_a_warning(tmp_path, recwarn):
    three_checkpoints(tmp_path)
    state, info = load_newest_valid(tmp_path)
    assert info["step"] == 3 and info["skipped"] == [] and not info["fallback"]
    assert not recwarn.list


def test_two_damaged_are_both_named_newest_first(tmp_path):
    first, second, third = three_checkpoints(tmp_path)
    flip_byte(third / "tensors.safetensors")
    (second / "state.json").unlink()
    with pytest.warns(RuntimeWarning) as caught:
        state, info = load_newest_valid(tmp_path)
    assert info["step"] == 1
    assert [p.name for p, _ in info["skipped"]] == ["step-000003", "step-000002"]
    assert sum("step-000003" in str(w.message) for w in caught) == 1
    assert sum("step-000002" in str(w.message) for w in caught) == 1


def test_none_valid_lists_what_was_wrong_with_each(tmp_path):
    first, second, third = three_checkpoints(tmp_path)
    flip_byte(third / "tensors.safetensors")
    (second / "state.json").unlink()
    truncate(first / "state.json")
    with pytest.raises(CheckpointError, match="no valid checkpoint") as raised:
        load_newest_valid(tmp_path)
    lines = str(raised.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "step-000003", "step-000002", "step-000001"]
    assert "SHA-256" in lines[0] and "state.json: missing" in lines[1] and "not valid JSON" in lines[2]


def test_a_checkpoint_directory_given_directly_is_not_replaced_by_another(tmp_path):
    *_, newest = three_checkpoints(tmp_path)
    flip_byte(newest / "tensors.safetensors")
    with pytest.raises(CheckpointError, match="step-000003/tensors.safetensors: SHA-256"):
        load_newest_valid(newest)


def test_latest_target_is_tried_first_and_strict_load_is_unchanged(tmp_path):
    three_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-000002\n")
    assert load_newest_valid(tmp_path)[1]["step"] == 2
    *_, newest = list_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-000003\n")
    flip_byte(newest / "tensors.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):  # load_checkpoint never falls back
        load_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: checkpoints at steps 20, 30 and 32 (keep_last 3)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--config", str(EXAMPLES / "tiny.toml"), "--run-dir", str(run_dir),
                 "--threads", "1", "--progress", "lines"]) == 0
    assert [p.name for p in list_checkpoints(run_dir)][-2:] == ["step-000030", "step-000032"]
    return run_dir


@pytest.mark.parametrize("kind", ["tensors byte changed", "tensors missing", "state.json truncated"])
def test_cli_eval_and_resume_skip_a_damaged_newest(trained, tmp_path, capsys, kind):
    import shutil

    damage, error = DAMAGE[kind]
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    damage(run_dir / "checkpoints" / "step-000032")
    capsys.readouterr()

    assert main(["eval", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "step-000030 (step 30): eval loss" in captured.out
    assert "skipped the damaged checkpoint step-000032" in captured.err and error in captured.err

    assert main(["train", "--resume", str(run_dir), "--train.epochs", "3", "--progress",
                 "lines"]) == 0
    captured = capsys.readouterr()
    assert "skipped the damaged checkpoint step-000032" in captured.err and error in captured.err
    assert "step-000030 (step 30)" in captured.err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 48
    assert load_checkpoint(run_dir)[1]["step"] == 48
