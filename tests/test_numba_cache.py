"""npcpu's compiled kernels are cached in a per-user folder, never inside the package (npcpu/numba_cache.py).

Files written beside an installed npcpu outlive `pip uninstall` and turn the leftover folder into a
namespace package that shadows the real npcpu; these tests run a kernel in a fresh process and look
where its cache went.
"""

import os
import subprocess
import sys
from pathlib import Path

import npcpu
from npcpu.numba_cache import PACKAGE_DIR, NpcpuCacheLocator, folder_stamp

RUN_A_KERNEL = "import numpy as np, npcpu; npcpu.nn.ReLU().forward(np.ones((3, 5), np.float32))"


def _cache_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


def _run(env_updates: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(env_updates)
    env["PYTHONPATH"] = str(PACKAGE_DIR.parent) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", RUN_A_KERNEL], check=True, env=env, cwd=tmp_path)


def test_kernels_are_cached_under_the_user_cache_folder_not_the_package(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in _cache_files(PACKAGE_DIR)}
    _run({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path)
    written = _cache_files(tmp_path / "xdg" / "npcpu" / "numba")
    assert any(p.parent.name.startswith("kernels_") for p in written), sorted(map(str, written))
    after = {p: p.stat().st_mtime_ns for p in _cache_files(PACKAGE_DIR)}
    assert after == before, "a kernel's cache was written inside the npcpu package"


def test_numba_cache_dir_set_by_the_user_wins(tmp_path):
    _run({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "NUMBA_CACHE_DIR": str(tmp_path / "mine")},
         tmp_path)
    assert _cache_files(tmp_path / "mine")
    assert not (tmp_path / "xdg" / "npcpu").exists()


def test_the_locator_declines_code_outside_npcpu(tmp_path):
    elsewhere = tmp_path / "user_code.py"
    elsewhere.write_text("def f():\n    return 1\n")
    namespace = {}
    exec(compile(elsewhere.read_text(), str(elsewhere), "exec"), namespace)
    assert NpcpuCacheLocator.from_function(namespace["f"], str(elsewhere)) is None


def test_subpackages_are_attributes_of_npcpu():
    assert npcpu.nn.Linear(3, 2).weight.shape == (2, 3)
    for name in npcpu.SUBPACKAGES:
        assert name in dir(npcpu) and getattr(npcpu, name).__name__ == f"npcpu.{name}"


def test_the_stamp_changes_with_any_file_of_the_folder(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = folder_stamp(tmp_path)
    assert folder_stamp(tmp_path) == first
    (tmp_path / "notes.txt").write_text("not code")
    assert folder_stamp(tmp_path) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    changed = folder_stamp(tmp_path)
    assert changed != first
    (tmp_path / "c.py").write_text("")
    assert folder_stamp(tmp_path) != changed


def test_a_change_to_another_kernel_file_recompiles_a_cached_kernel(tmp_path):
    """ReLU's kernel (kernels/activations.py) is cached; an edit to kernels/fastexp.py alone must
    make the next process compile it again (Numba's own stamp would keep the old machine code)."""
    import shutil

    copy = tmp_path / "src" / "npcpu"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(copy.parent))

    def relu_indexes() -> dict:
        subprocess.run([sys.executable, "-c", RUN_A_KERNEL], check=True, env=env, cwd=tmp_path)
        found = (tmp_path / "xdg" / "npcpu" / "numba").rglob("activations.*.nbi")
        return {p: p.read_bytes() for p in found}

    first = relu_indexes()
    assert first
    assert relu_indexes() == first  # unchanged sources: loaded, not written again
    with open(copy / "kernels" / "fastexp.py", "a") as f:
        f.write("\n# an edit\n")
    assert relu_indexes() != first
