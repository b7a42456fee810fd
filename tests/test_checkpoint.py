"""Checkpoints: exact round trips, crash safety at every file-system step, retention, validation."""

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from npcpu.checkpoint import durable
from npcpu.checkpoint import (CheckpointError, best_checkpoint, export_model, flatten_state,
                              list_checkpoints, load_checkpoint, save_checkpoint, unflatten_state)


def make_state(seed: int = 0) -> dict:
    """A trainer-like state: every supported array dtype, int keys, tuples, exact floats."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((7, 5)).astype(np.float32)
    return {
        "model": {
            "0.weight": weight,
            "0.bias": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
            "2.weight": rng.standard_normal((3, 7)).astype(np.float16),
            "2.bias": rng.standard_normal(3),  # float64
        },
        "optimizer": {
            "state": {0: {"step": np.int64(seed + 3), "exp_avg": weight[:, ::2].T},  # strided
                      3: {"step": 2**70, "exp_avg": rng.integers(-9, 9, (2, 3), dtype=np.int64)}},
            "param_groups": [{"lr": 0.1 / 3, "betas": (0.9, 0.999), "eps": 1e-8,
                              "params": [0, 3], "amsgrad": False, "maximize": None}],
        },
        "floats": [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308,
                   np.float32(0.1), seed + 0.5],
        "text": ["", "ünïcødé \u2603", "__tensor__"],
        "user_dict_with_marker_key": {"__tensor__": "not a tensor", "__tuple__": [1, 2]},
        "odd_keys": {True: "bool", 1.5: "float", None: "none", (1, "a"): "tuple", "1": "str"},
        "nested": [[[]], [np.array(True), np.zeros((0, 3), np.float32)], {"deep": {"er": None}}],
        "mask": rng.random((4, 4)) > 0.5,
    }


def assert_same_tree(a, b, path="root"):
    """Structure, Python types and array bits identical (nan compares equal to nan)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape}"
        np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8),
                                      np.ascontiguousarray(b).view(np.uint8), err_msg=path)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert type(key) is type([k for k in b if k == key][0])
            assert_same_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) ==
                                                     math.copysign(1, b)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def python_scalars(tree):
    """What a state looks like after a round trip: numpy scalars as Python scalars."""
    if isinstance(tree, dict):
        return {python_scalars(k): python_scalars(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [python_scalars(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(python_scalars(v) for v in tree)
    return tree.item() if isinstance(tree, np.generic) else tree


# -- round trips ------------------------------------------------------------------------------------
def test_flatten_names_tensors_by_dotted_path_and_meta_is_strict_json():
    state = make_state()
    tensors, meta = flatten_state(state)
    assert tensors["optimizer.state.0.exp_avg"] is state["optimizer"]["state"][0]["exp_avg"]
    assert set(tensors) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias",
                            "optimizer.state.0.exp_avg", "optimizer.state.3.exp_avg",
                            "nested.1.0", "nested.1.1", "mask"}
    text = json.dumps(meta, allow_nan=False)
    assert_same_tree(unflatten_state(tensors, json.loads(text)), python_scalars(state))


def test_save_load_round_trip_is_bitwise(tmp_path):
    state = make_state()
    path = save_checkpoint(tmp_path / "run", state, step=123, metric=0.25,
                           config={"lr": 0.1, "layers": [784, 10], "name": "x"})
    assert path == tmp_path / "run" / "checkpoints" / "step-000123"
    loaded, info = load_checkpoint(tmp_path / "run")
    assert_same_tree(loaded, python_scalars(state))
    assert info["step"] == 123 and info["metric"] == 0.25 and info["mode"] == "min"
    assert info["config"] == {"lr": 0.1, "layers": [784, 10], "name": "x"}
    assert info["path"] == path and info["fallback"] is False
    assert set(info["versions"]) >= {"npcpu", "numpy", "numba", "python"}
    loaded["model"]["0.bias"][0] = 1  # loaded arrays are writable
    assert_same_tree(load_checkpoint(path)[0], python_scalars(state))  # a checkpoint dir works too


def test_flatten_rejects_what_json_cannot_hold_exactly():
    with pytest.raises(TypeError, match="nested.0.*complex"):
        flatten_state({"nested": [np.complex64(1j)]})
    with pytest.raises(TypeError, match="set"):
        flatten_state({"a": {1, 2}})
    with pytest.raises(ValueError, match="'a.b'"):
        flatten_state({"a.b": np.zeros(1), "a": {"b": np.zeros(1)}})
    with pytest.raises(ValueError, match="bare array"):
        flatten_state(np.zeros(2))


def test_save_rejects_unsupported_dtype_before_touching_disk(tmp_path):
    with pytest.raises(TypeError, match="'w'.*complex128"):
        save_checkpoint(tmp_path / "run", {"w": np.zeros(2, np.complex128)}, step=0)
    with pytest.raises(TypeError, match="config"):
        save_checkpoint(tmp_path / "run", {}, step=0, config={"w": np.zeros(2)})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, error", [
    ({"step": -1}, ValueError), ({"step": 1.0}, ValueError), ({"step": 1, "keep_last": 0}, ValueError),
    ({"step": 1, "mode": "best"}, ValueError), ({"step": 1, "metric": "0.5"}, TypeError),
])
def test_save_validates_arguments(tmp_path, kwargs, error):
    with pytest.raises(error, match="save_checkpoint"):
        save_checkpoint(tmp_path, {}, **kwargs)


# -- retention ----------------------------------------------------------------------------------------
def steps(run_dir):
    return [p.name for p in list_checkpoints(run_dir)]


@pytest.mark.parametrize("mode, metrics, best", [
    ("min", [5.0, 1.0, 3.0, math.nan, 4.0, 2.0], "step-000001"),
    ("max", [5.0, 1.0, 3.0, math.nan, 4.0, 2.0], "step-000000"),
])
def test_keeps_last_n_plus_best(tmp_path, mode, metrics, best):
    for step, metric in enumerate(metrics):
        save_checkpoint(tmp_path, {"w": np.full(2, step, np.float32)}, step=step, keep_last=2,
                        metric=metric, mode=mode)
    assert steps(tmp_path) == sorted([best, "step-000004", "step-000005"])
    assert best_checkpoint(tmp_path).name == best
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest"] + steps(tmp_path)


def test_nan_metric_is_never_best_and_no_metric_means_no_best(tmp_path):
    save_checkpoint(tmp_path, {}, step=0)
    assert best_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, {}, step=1, metric=math.nan)
    assert best_checkpoint(tmp_path) is None


def test_resaving_a_step_makes_a_new_revision_and_prunes_the_old(tmp_path):
    save_checkpoint(tmp_path, {"w": np.zeros(1)}, step=7)
    save_checkpoint(tmp_path, {"w": np.ones(1)}, step=7)
    assert steps(tmp_path) == ["step-000007.2"]
    assert load_checkpoint(tmp_path)[0]["w"][0] == 1
    save_checkpoint(tmp_path, {"w": np.full(1, 2.0)}, step=7, keep_last=None)
    assert steps(tmp_path) == ["step-000007.2", "step-000007.3"]
    assert load_checkpoint(tmp_path)[0]["w"][0] == 2


def test_newest_save_is_kept_even_when_its_step_is_lower(tmp_path):
    save_checkpoint(tmp_path, {}, step=10)
    save_checkpoint(tmp_path, {"w": np.ones(1)}, step=5, keep_last=1)
    assert load_checkpoint(tmp_path)[1]["step"] == 5
    assert steps(tmp_path) == ["step-000005", "step-000010"]


# -- crash safety -------------------------------------------------------------------------------------
class SimulatedCrash(OSError):
    pass


class CrashAt:
    """Fail the k-th file-system call a save makes, and every call after it (the process is dead).

    A crash inside `open` for writing leaves an empty file.
    """

    def __init__(self, monkeypatch, k: int):
        self.k, self.calls, self.crashed, self.pointer_replaced = k, 0, False, False
        for owner, name in [(os, "mkdir"), (os, "rename"), (os, "replace"), (os, "fsync"),
                            (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]:
            monkeypatch.setattr(owner, name, self.wrap(name, getattr(owner, name)))
        monkeypatch.setattr(durable, "open", self.wrap("open", open), raising=False)

    def wrap(self, name, function):
        def crashing(*args, **kwargs):
            self.calls += 1
            if self.crashed or self.calls == self.k:
                if not self.crashed and name == "open" and "r" not in args[1]:
                    function(*args, **kwargs).close()
                self.crashed = True
                raise SimulatedCrash(f"simulated crash in {name} (call {self.calls})")
            result = function(*args, **kwargs)
            if name == "replace" and Path(args[1]).name == "latest":
                self.pointer_replaced = True
            return result
        return crashing


def test_a_crash_at_any_step_leaves_latest_loadable(tmp_path, monkeypatch):
    base = tmp_path / "base"
    save_checkpoint(base, make_state(1), step=1)
    save_checkpoint(base, make_state(2), step=2)
    previous, new = python_scalars(make_state(2)), python_scalars(make_state(3))
    k = 0
    while True:
        k += 1
        run = tmp_path / f"run{k}"
        shutil.copytree(base, run)
        with monkeypatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a crash while pruning only warns
            crash = CrashAt(patch, k)
            try:
                save_checkpoint(run, make_state(3), step=3, keep_last=1)
            except SimulatedCrash:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # `latest` must never need the fallback
            state, info = load_checkpoint(run)
        assert_same_tree(state, new if crash.pointer_replaced else previous)
        assert info["step"] == (3 if crash.pointer_replaced else 2)

        save_checkpoint(run, make_state(4), step=4, keep_last=1)  # cleans up the leftovers
        assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-000004"]
        assert_same_tree(load_checkpoint(run)[0], python_scalars(make_state(4)))
        shutil.rmtree(run)
        if not crash.crashed:
            break
    print(f"{k - 1} crash points")
    assert k > 15  # every step of the protocol was hit: mkdir, writes, fsyncs, renames, pruning


def test_durability_order(tmp_path, monkeypatch):
    """Each file and directory is fsynced before the rename that publishes it; pruning comes last."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name fsynced file descriptors")
    save_checkpoint(tmp_path, {"w": np.zeros(3)}, step=1, keep_last=1)
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (
        events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (
        events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    final = save_checkpoint(tmp_path, {"w": np.ones(3)}, step=2, keep_last=1)
    root = str(tmp_path / "checkpoints")

    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    tmp = events[publish][1]
    assert {("fsync", f"{tmp}/tensors.safetensors"), ("fsync", f"{tmp}/state.json"),
            ("fsync", tmp)} <= set(events[:publish])
    pointer = next(i for i, e in enumerate(events) if e[0] == "replace")
    assert ("fsync", root) in events[publish + 1:pointer]
    assert events[pointer - 1] == ("fsync", events[pointer][1])  # the pointer's temporary file
    assert events[pointer + 1] == ("fsync", root)
    assert all(".trash-" not in e[2] for e in events[:pointer] if e[0] == "rename")
    assert any(".trash-step-000001" in e[2] for e in events[pointer:] if e[0] == "rename")


def test_leftovers_are_ignored_by_load_and_removed_by_the_next_save(tmp_path):
    save_checkpoint(tmp_path, {"w": np.ones(2)}, step=1)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000009-123-abcd").mkdir()
    (root / ".tmp-step-000009-123-abcd" / "tensors.safetensors").write_bytes(b"\0" * 5)
    (root / ".trash-step-000000-1-ab").mkdir()
    (root / ".latest-1-ab.tmp").write_text("step-000009\n")
    (root / "step-000008").mkdir()  # incomplete: no files
    (root / "latest").unlink()
    with pytest.warns(RuntimeWarning, match="latest is broken.*step-000001"):
        state, info = load_checkpoint(tmp_path)
    assert info["fallback"] and info["step"] == 1
    save_checkpoint(tmp_path, {"w": np.ones(2)}, step=2)
    assert sorted(os.listdir(root)) == ["latest", "step-000001", "step-000002", "step-000008"]


@pytest.mark.parametrize("pointer", [None, "step-000005\n", "../../etc\n", b"\xff\xfe"])
def test_broken_pointer_falls_back_to_newest_with_a_warning(tmp_path, pointer):
    save_checkpoint(tmp_path, {"w": np.zeros(1)}, step=1)
    save_checkpoint(tmp_path, {"w": np.ones(1)}, step=2)
    latest = tmp_path / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    with pytest.warns(RuntimeWarning, match="loading the newest complete checkpoint, step-000002"):
        state, info = load_checkpoint(tmp_path)
    assert state["w"][0] == 1 and info["fallback"]


def test_no_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_checkpoint(tmp_path / "checkpoints")


# -- unwritable run directories -------------------------------------------------------------------------
def test_run_dir_that_is_a_file_fails_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("x")
    for run_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(NotADirectoryError, match="is not a directory"):
            save_checkpoint(run_dir, {"w": np.zeros(1)}, step=0)
    assert os.listdir(tmp_path) == ["file"]


def test_unwritable_run_dir_fails_before_anything_is_written(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": np.zeros(1)}, step=0)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="cannot write to"):
        save_checkpoint(tmp_path, {"w": np.ones(1)}, step=1)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_run_dir_with_real_permissions(tmp_path):
    save_checkpoint(tmp_path, {"w": np.zeros(1)}, step=0)
    (tmp_path / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot write to"):
            save_checkpoint(tmp_path, {"w": np.ones(1)}, step=1)
    finally:
        (tmp_path / "checkpoints").chmod(0o755)
    assert load_checkpoint(tmp_path)[1]["step"] == 0


# -- validation of damaged checkpoints -------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    return save_checkpoint(tmp_path, {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                "b": np.ones(2, ml_dtypes.bfloat16)},
                                      "step": 5}, step=5)


def rewrite_tensors(directory: Path, tensors: dict) -> None:
    """Replace the tensors file and record its true hash, so that checks past the hash are reached."""
    save_file(tensors, directory / "tensors.safetensors")
    edit_json(directory, lambda doc: doc.update(tensors_sha256=durable.fsync_and_hash(
        directory / "tensors.safetensors")))


def edit_json(directory: Path, edit) -> None:
    doc = json.loads((directory / "state.json").read_text())
    edit(doc)
    (directory / "state.json").write_text(json.dumps(doc))


def test_truncated_tensors_file(saved):
    data = (saved / "tensors.safetensors").read_bytes()
    (saved / "tensors.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match="tensors.safetensors: SHA-256 mismatch"):
        load_checkpoint(saved)


def test_flipped_byte_in_tensors_file(saved):
    data = bytearray((saved / "tensors.safetensors").read_bytes())
    data[-1] ^= 0x10
    (saved / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(saved)


def test_wrong_shape_in_json(saved):
    edit_json(saved, lambda doc: doc["state"]["tree"]["model"]["w"].update(shape=[3, 2]))
    with pytest.raises(CheckpointError, match=r"state.json: tensor 'model.w': expected dtype "
                                              r"float32 and shape \(3, 2\), found float32 and "
                                              r"shape \(2, 3\)"):
        load_checkpoint(saved)


def test_wrong_dtype_in_tensors_file(saved):
    rewrite_tensors(saved, {"model.w": np.zeros((2, 3), np.float16),
                            "model.b": np.ones(2, ml_dtypes.bfloat16)})
    with pytest.raises(CheckpointError, match="'model.w': expected dtype float32.*found float16"):
        load_checkpoint(saved)


def test_missing_and_extra_tensors(saved):
    rewrite_tensors(saved, {"model.w": np.zeros((2, 3), np.float32)})
    with pytest.raises(CheckpointError, match="tensor 'model.b' .* missing"):
        load_checkpoint(saved)
    rewrite_tensors(saved, {"model.w": np.zeros((2, 3), np.float32),
                            "model.b": np.ones(2, ml_dtypes.bfloat16), "stray": np.zeros(1)})
    with pytest.raises(CheckpointError, match="not referenced by the state, first 'stray'"):
        load_checkpoint(saved)


def test_non_finite_tensor_is_named(tmp_path):
    bad = np.array([1.0, np.nan], ml_dtypes.bfloat16)
    save_checkpoint(tmp_path, {"a": np.ones(2), "b": bad, "c": np.array([np.inf])}, step=0)
    with pytest.raises(CheckpointError, match="tensor 'b' holds non-finite"):
        load_checkpoint(tmp_path)
    assert np.isnan(load_checkpoint(tmp_path, check_finite=False)[0]["b"][1])


def test_broken_json_and_missing_files(saved):
    (saved / "state.json").write_text('{"format": "npcpu-checkpoint", ')
    with pytest.raises(CheckpointError, match="state.json: not valid JSON"):
        load_checkpoint(saved)
    (saved / "state.json").write_text('{"format": "npcpu-checkpoint", "step": NaN}')
    with pytest.raises(CheckpointError, match="state.json: not valid JSON.*NaN"):
        load_checkpoint(saved)
    (saved / "state.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not an npcpu checkpoint"):
        load_checkpoint(saved)
    (saved / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json: missing"):
        load_checkpoint(saved)


def test_tensors_file_missing_or_malformed(saved):
    (saved / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match="tensors.safetensors: missing"):
        load_checkpoint(saved)
    header = json.dumps({"model.w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 99]}})
    (saved / "tensors.safetensors").write_bytes(len(header).to_bytes(8, "little")
                                                + header.encode() + bytes(24))
    edit_json(saved, lambda doc: doc.update(tensors_sha256=durable.fsync_and_hash(
        saved / "tensors.safetensors")))
    with pytest.raises(CheckpointError, match="'model.w'.*does not fit data_offsets"):
        load_checkpoint(saved)


def test_corrupt_target_of_latest_is_an_error_not_a_silent_fallback(tmp_path):
    save_checkpoint(tmp_path, {"w": np.zeros(1)}, step=1)
    newest = save_checkpoint(tmp_path, {"w": np.zeros(1)}, step=2)
    (newest / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step-000002/tensors.safetensors: SHA-256"):
        load_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = save_checkpoint(tmp_path_factory.mktemp("pristine"), make_state(), step=1)
    return {name: (directory / name).read_bytes() for name in ("state.json", "tensors.safetensors")}


def load_damaged(files: dict):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "step-000001"
        directory.mkdir()
        for name, data in files.items():
            (directory / name).write_bytes(data)
        return load_checkpoint(directory, check_finite=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_tensors_file_damage_is_always_detected(pristine, data):
    tensors = bytearray(pristine["tensors.safetensors"])
    if data.draw(st.booleans(), "truncate"):
        tensors = tensors[:data.draw(st.integers(0, len(tensors) - 1), "length")]
    else:
        position = data.draw(st.integers(0, len(tensors) - 1), "position")
        tensors[position] ^= data.draw(st.integers(1, 255), "xor")
    with pytest.raises(CheckpointError, match="tensors.safetensors"):
        load_damaged({"state.json": pristine["state.json"], "tensors.safetensors": bytes(tensors)})


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_json_damage_is_detected_or_harmless(pristine, data):
    """A byte flip in state.json gives a CheckpointError, or a load (e.g. a changed digit in
    `saved_at`); never another exception."""
    text = bytearray(pristine["state.json"])
    for _ in range(data.draw(st.integers(1, 3), "flips")):
        text[data.draw(st.integers(0, len(text) - 1), "position")] ^= data.draw(
            st.integers(1, 255), "xor")
    try:
        load_damaged({"state.json": bytes(text),
                      "tensors.safetensors": pristine["tensors.safetensors"]})
    except CheckpointError as err:
        assert "state.json" in str(err) or "tensors.safetensors" in str(err)


# -- torch interop ------------------------------------------------------------------------------------
def mlp_state(rng, dtype) -> dict:
    """A state dict with torch's keys for nn.Sequential(Linear(5, 7), ReLU(), Linear(7, 3))."""
    return {"0.weight": rng.standard_normal((7, 5)).astype(dtype),
            "0.bias": rng.standard_normal(7).astype(dtype),
            "2.weight": rng.standard_normal((3, 7)).astype(dtype),
            "2.bias": rng.standard_normal(3).astype(dtype)}


def torch_mlp(torch, dtype):
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(),
                               torch.nn.Linear(7, 3)).to(dtype)


def test_exported_model_loads_into_torch(torch, tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    state = mlp_state(rng, np.float32)
    path = export_model(tmp_path / "model.safetensors", state)
    module = torch_mlp(torch, torch.float32)
    module.load_state_dict(load_file(path))  # strict: keys and shapes match torch's
    x = rng.standard_normal((4, 5)).astype(np.float32)
    expected = np.maximum(x @ state["0.weight"].T + state["0.bias"], 0) @ state["2.weight"].T \
        + state["2.bias"]
    with torch.no_grad():
        out = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_bfloat16_checkpoint_model_loads_into_torch_as_bfloat16(torch, tmp_path):
    from safetensors.torch import load_file

    state = mlp_state(np.random.default_rng(1), ml_dtypes.bfloat16)
    directory = save_checkpoint(tmp_path, {"model": state, "optimizer": {"state": {}}}, step=3)
    tensors = load_file(directory / "tensors.safetensors")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    module = torch_mlp(torch, torch.bfloat16)
    module.load_state_dict(model_state)
    for name, array in state.items():
        tensor = module.state_dict()[name]
        assert tensor.dtype == torch.bfloat16
        np.testing.assert_array_equal(tensor.view(torch.int16).numpy(), array.view(np.int16))


def test_tensors_file_reads_the_same_through_safetensors_numpy(tmp_path):
    """Our header parser and the reference reader agree (bfloat16 included)."""
    from safetensors.numpy import load_file

    state = make_state()
    directory = save_checkpoint(tmp_path, state, step=0)
    reference = load_file(directory / "tensors.safetensors")
    tensors, _ = flatten_state(load_checkpoint(directory, check_finite=False)[0])
    assert sorted(reference) == sorted(tensors)
    for name, array in tensors.items():
        assert_same_tree(array, reference[name], name)


def test_export_model_checks_its_directory_and_types(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="export_model"):
        export_model(tmp_path / "file" / "model.safetensors", {"w": np.zeros(1)})
    with pytest.raises(TypeError, match="'w'"):
        export_model(tmp_path / "model.safetensors", {"w": [1.0]})
    assert os.listdir(tmp_path) == ["file"]
