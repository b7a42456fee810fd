"""Smoke run of bench/ablations.py --quick on two groups: child processes, table, JSON, comparisons."""

import json
import subprocess
import sys
from pathlib import Path

ABLATIONS = Path(__file__).resolve().parents[1] / "bench" / "ablations.py"


def test_quick_ablations_run_and_report(tmp_path):
    output = tmp_path / "ablations"
    done = subprocess.run([sys.executable, str(ABLATIONS), "--quick", "--only", "fused", "freezing",
                           "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(output.with_suffix(".json").read_text())
    arms = record["arms"]
    assert record["quick"] and record["threads_per_arm"] == 1
    assert [a["group"] for a in arms] == ["fused"] * 2 + ["freezing"] * 2
    fused, unfused = arms[0], arms[1]
    # Same weights, same data order, same math: the two layouts train to the same losses.
    assert fused["curve"]["loss"] == unfused["curve"]["loss"] or \
        max(abs(a - b) for a, b in zip(fused["curve"]["loss"], unfused["curve"]["loss"])) < 1e-3
    assert fused["gemms_run"] == unfused["gemms_run"]
    frozen_run, plain_run = arms[2], arms[3]
    assert frozen_run["frozen_at"] and not plain_run["frozen_at"]
    assert frozen_run["gemms_run"] < plain_run["gemms_run"]
    assert all(a["peak_rss_mb"] >= a["rss_before_fit_mb"] > 0 for a in arms)
    assert all(a["steps"] == len(a["curve"]["loss"]) for a in arms)
    assert "| fused | Linear + ReLU |" in done.stdout
    assert "- freezing: training" in done.stdout
