"""SIGKILL anywhere: 20 seeded kills per system (the MLP run and the GPT run of run_training.py)
at random times, inside checkpoint writes and prunings, after an optimizer update, inside an
evaluation and while resuming; each run resumed to the end. Every checkpoint left behind by a
kill loads, and every final state and metrics history is bitwise the uninterrupted run's.

tests/run_kills.py does the killing (forks of one process, so 2 x 20 kills fit in a test);
`pytest -s` prints the table of kills per kind.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from statecheck import assert_same_state
from test_resume import final_state, train_history

SCRIPT = Path(__file__).resolve().parent / "run_kills.py"
KILLS = 20

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="run_kills.py forks without exec, which is safe on Linux only")


def category(kill: dict) -> str:
    """The table row of a kill: where in the run it struck."""
    if kill["kind"] == "file":
        return f"file-system call: {kill['phase']}"
    return {"time": "random time", "step": "after an update, before it is counted",
            "eval": "inside an evaluation", "resume-load": "resuming: checkpoint just loaded",
            "resume-file": "resuming: cutting the metrics file"}[kill["kind"]]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    work = tmp_path_factory.mktemp("kills")
    processes = {system: subprocess.Popen(
        [sys.executable, str(SCRIPT), system, str(work / system), "--kills", str(KILLS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for system in ("mlp", "lm")}
    found = {}
    for system, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        found[system] = json.loads((work / system / "report.json").read_text())
    rows = {}
    for system, report in found.items():
        for trial in report["trials"]:
            for kill in trial["kills"]:
                row = rows.setdefault((system, category(kill)), [0, 0, 0])
                row[0] += 1
                row[1] += len(kill["checkpoints"])
                row[2] += len(kill["errors"])
    print(f"\n{'system':<6} {'kill point':<44} {'kills':>5} {'checkpoints left':>16} {'errors':>6}")
    for (system, where), (kills, left, errors) in sorted(rows.items()):
        print(f"{system:<6} {where:<44} {kills:>5} {left:>16} {errors:>6}")
    return found


@pytest.mark.parametrize("system", ["mlp", "lm"])
def test_every_kill_struck_and_left_loadable_checkpoints(reports, system):
    kills = [kill for trial in reports[system]["trials"] for kill in trial["kills"]]
    assert len(kills) == KILLS
    for kill in kills:
        assert kill["status"] == "SIGKILL", kill
        assert kill["errors"] == [], kill
    kinds = Counter(kill["kind"] for kill in kills)
    assert {"time", "file", "step", "eval"} <= set(kinds), kinds
    assert kinds["resume-load"] + kinds["resume-file"] >= 1, kinds
    # at least one kill inside a checkpoint write and one with a checkpoint already on disk
    assert {kill.get("phase") for kill in kills} >= {"checkpoint write", "pointing latest",
                                                     "pruning", "run start"}
    assert any(kill["checkpoints"] for kill in kills)


@pytest.mark.parametrize("system", ["mlp", "lm"])
def test_every_resumed_run_is_bitwise_the_uninterrupted_one(reports, system):
    reference = Path(reports[system]["reference"])
    for trial in reports[system]["trials"]:
        run_dir = Path(trial["run_dir"])
        assert trial["final_status"] == "exit 0", run_dir
        assert train_history(run_dir) == train_history(reference), run_dir
        assert_same_state(final_state(run_dir), final_state(reference))
