"""Smoke tests of bench/: bench_train.py (one quick logreg-mnist round on 2,048 samples, JSON
checked) and profile_mlp52m.py (one profiled step, its table checked).

Timings are not asserted (docs/DESIGN.md: speed is measured by bench/, never by a timed unit test); this
checks that the chosen configurations each ran in a process of their own and that the record has
its fields, the npcpu/torch ratios and the targets.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_train.py"
PROFILE = BENCH.parent / "profile_mlp52m.py"
CONFIGS = ["npcpu layer loop", "npcpu Trainer.fit", "torch eager, default SGD"]


def test_bench_train_quick_logreg_writes_expected_json(torch, tmp_path):
    output = tmp_path / "bench_train.json"
    selection = [arg for name in CONFIGS for arg in ("--configs", name)]
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--workload", "logreg-mnist",
                           "--rounds", "1", "--samples", "2048", *selection,
                           "--output", str(output)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| configuration |" in done.stdout
    record = json.loads(output.read_text())
    for key in ("bench", "time_utc", "machine", "threads", "rounds", "workloads", "targets"):
        assert key in record
    for key in ("cpu", "cores", "blas", "numba_threading", "environment", "torch"):
        assert key in record["machine"]
    logreg = record["workloads"]["logreg-mnist"]
    assert list(logreg["results"]) == CONFIGS
    for result in logreg["results"].values():
        assert "error" not in result, result
        assert result["samples_per_step"] == 2048
        assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]
        for key in ("samples_per_s", "peak_rss_mb", "rss_after_imports_mb", "first_call_s", "info"):
            assert result[key] is not None
    assert logreg["results"]["torch eager, default SGD"]["info"]["implementation"]
    assert set(logreg["ratios"]) == {"npcpu layer loop", "npcpu Trainer.fit"}
    for versus in logreg["ratios"].values():
        assert set(versus) == {"torch eager, default SGD"} and versus["torch eager, default SGD"] > 0
    # the layer loop's 2x torch, Trainer.fit's 17 ms and 5x torch (naive NumPy did not run)
    assert [t["met"] in (True, False) for t in record["targets"]] == [True] * 3


def test_profile_mlp52m_reports_every_phase_of_a_step_inside_backward():
    done = subprocess.run([sys.executable, str(PROFILE), "--steps", "1", "--precision", "bf16",
                           "--update-in-backward", "--bf16-gemm", "widened"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    for phase in ("forward GEMMs", "dx GEMMs", "dW GEMMs", "bf16 widening", "Adam updates", "step"):
        assert phase in rows, done.stdout
    assert "the same GEMMs alone (the roofline's)" in done.stdout


def test_profile_mlp52m_reports_the_native_bf16_phases():
    from npcpu import backend
    reason = backend.native_bf16_gemm_unavailable()
    if reason is not None:
        pytest.skip(f"native bf16 GEMM unavailable: {reason}")
    done = subprocess.run([sys.executable, str(PROFILE), "--steps", "1", "--precision", "bf16",
                           "--bf16-gemm", "native"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip() for line in done.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert {"forward GEMMs", "dx GEMMs", "dW GEMMs", "bf16 rounding", "Adam updates"} <= rows


def test_bench_gemm_bf16_quick_writes_expected_json(tmp_path):
    from npcpu import backend
    output = tmp_path / "gemm.json"
    done = subprocess.run([sys.executable, str(BENCH.parent / "bench_gemm_bf16.py"), "--quick",
                           "--repeats", "2", "--output", str(output)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads(output.read_text())
    assert record["bench"] == "bench_gemm_bf16-quick" and record["machine"]["bf16_gemm"]
    key = "smoke 33x70x45 dW"
    assert record["gflop_s"]["npcpu sgemm"][key]["median"] > 0
    if backend.native_bf16_gemm_unavailable() is None:
        assert record["comparison"][key]["x npcpu sgemm"] > 0
        assert record["gflop_s"]["bf16 peak (registers)"]["median"] > 0
