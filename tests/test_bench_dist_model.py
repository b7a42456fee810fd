"""The alpha-beta model of bench/bench_dist_model.py, and one host's profile it is fed with
(bench/bench_dist_profile.py on the default preset, 1 process)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_dist_model import exposed, host_share, model  # noqa: E402
from bench_dist_profile import profile  # noqa: E402

MB = 2**20


def test_host_share_splits_the_batch_else_the_window_else_refuses():
    assert host_share(128, 1, 2) == (64, 1)
    assert host_share(2, 8, 4) == (2, 2)
    assert host_share(3, 5, 2) is None


def test_exposed_reduction_nothing_when_the_link_keeps_up_with_backward():
    # 4 buckets of 25 MB over a 1 s backward; each takes 0.1 s: all but the last hide
    assert exposed(1.0, 100 * MB, 25 * MB, lambda size: 0.1) == pytest.approx(0.1)


def test_exposed_reduction_when_the_link_is_slower_than_backward():
    # the link serves 1 s per bucket from the first bucket's end (0.25 s): 4.25 s in all
    assert exposed(1.0, 100 * MB, 25 * MB, lambda size: 1.0) == pytest.approx(3.25)
    # one bucket: everything after backward
    assert exposed(1.0, 100 * MB, 200 * MB, lambda size: 2.0) == pytest.approx(2.0)


def test_model_of_two_hosts_by_hand():
    phases = {"forward+loss": 0.1, "backward": 0.2, "total": 0.5}  # rest 0.2
    alpha, gbit, size, bucket = 25e-6, 10.0, 100 * MB, 25 * MB
    beta = 8 / (gbit * 1e9)
    step = model(phases, 2, 1, size / 2, size, bucket, alpha, gbit)
    # 2 (N-1) alpha + 2 (N-1)/N S beta; each bucket's reduction is shorter than backward takes
    # to finish the next one, so only the last bucket's runs past backward
    assert step["after"] == pytest.approx(0.5 + 2 * alpha + size * beta)
    assert step["overlap"] == pytest.approx(0.3 + 2 * alpha + bucket * beta + 0.2)
    # the reduce-scatter's last bucket, half the rest, the all-gather of the parameters
    assert step["shard"] == pytest.approx(0.3 + alpha + bucket / 2 * beta + 0.1
                                          + alpha + size / 4 * beta)
    assert step["hides_at_gbit"] == pytest.approx(8e-9 * size / (0.2 - 4 * 2 * alpha))
    # a window of 8 micro-batches communicates during the last one's backward only
    windowed = model(phases, 2, 8, size / 2, size, bucket, alpha, gbit)
    assert windowed["overlap"] > step["overlap"]


def test_profile_of_one_host_times_each_phase_and_prints_the_sizes():
    rate, (phases,), printed = profile(1, 1, 4, 1, "default", ["--train.epochs", "1"])
    assert rate > 0
    assert phases["forward+loss"] > 0 and phases["backward"] > 0 and phases["optimizer step"] > 0
    assert phases["total"] >= phases["forward+loss"] + phases["backward"]
    assert "gradients" in printed and "MiB" in printed
