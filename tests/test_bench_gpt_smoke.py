"""Smoke test of bench/bench_gpt.py: one --quick round (tiny GPT) of npcpu fp32 and torch fp32 (the
bf16 configurations run the same code with another precision), each in its own process, with the
profile, the generation and the targets in its JSON. Timings are not asserted (docs/DESIGN.md:
speed is measured by bench/, never by a timed unit test)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_gpt.py"


def test_bench_gpt_quick_writes_expected_json(torch, tmp_path):
    output = tmp_path / "bench_gpt.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--configs", "npcpu fp32",
                           "--configs", "torch fp32", "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| configuration |" in done.stdout
    record = json.loads(output.read_text())
    assert record["size"] == "tiny" and record["rounds"] == 1
    results = record["results"]
    assert list(results) == ["npcpu fp32", "torch fp32"]
    for result in results.values():
        assert "error" not in result, result
        assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]
        assert result["peak_rss_mb"] > 0 and result["loss"] > 0
    phases = results["npcpu fp32"]["phases_ms"]
    assert set(phases) == {"attention", "block Linear GEMMs", "head + cross-entropy", "AdamW",
                           "rest", "step"}
    assert results["npcpu fp32"]["roofline"]["gemm_gflop_per_step"] > 0
    for generation in record["generation"].values():
        assert generation["tokens_per_s"] > 0
    assert [t["met"] in (True, False) for t in record["targets"]] == [True] * 2
