"""End to end through the `npcpu` command: train a tiny config, eval, resume, info; the digits bar."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npcpu.cli import main
from npcpu.config import build_config
from npcpu.train.build import build_run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_tiny_config_then_eval_then_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(EXAMPLES / "tiny.toml"), "--run-dir", str(run_dir),
                 "--threads", "1", "--progress", "lines"]) == 0
    captured = capsys.readouterr()
    assert "final eval: loss" in captured.out
    assert "BLAS" in captured.err and "precision bf16" in captured.err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(k in train[0] for k in ("step", "epoch", "loss", "lr", "samples_per_s",
                                                  "grad_norm", "frozen_layers", "skipped_steps"))
    assert any(r["kind"] == "eval" for r in records)
    assert (run_dir / "metrics.csv").read_text().startswith("kind,step")

    assert main(["eval", str(run_dir)]) == 0
    assert "eval loss" in capsys.readouterr().out

    # the same run directory again without --resume: refused, nothing touched
    assert main(["train", "--config", str(EXAMPLES / "tiny.toml"), "--run-dir", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err

    # resume with a later stopping point continues from the last step
    assert main(["train", "--resume", str(run_dir), "--train.epochs", "3", "--progress",
                 "lines"]) == 0
    assert "resumed from" in capsys.readouterr().err


def test_saved_model_loads_into_torch(tmp_path, torch):
    from safetensors.torch import load_file

    from npcpu.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(EXAMPLES / "tiny.toml"), "--run-dir", str(run_dir),
                 "--train.precision", "fp32", "--progress", "lines"]) == 0
    tensors = load_file(str(list_checkpoints(run_dir)[-1] / "tensors.safetensors"))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}

    class LinearReLU(torch.nn.Linear):  # the torch twin of FusedLinearReLU: same keys, same layout
        def forward(self, x):
            return torch.relu(super().forward(x))

    net = torch.nn.Sequential(LinearReLU(16, 32), torch.nn.Linear(32, 4))
    net.load_state_dict(state)
    run = build_run(json.loads((run_dir / "config.json").read_text()))
    run.trainer.resume(run_dir)
    x, _ = run.eval_data.batch(np.arange(64))
    run.trainer.model.eval()
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(),
                               run.trainer.model.forward(x), rtol=1e-5, atol=1e-5)


def test_module_entry_point_and_info():
    result = subprocess.run([sys.executable, "-m", "npcpu", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for word in ("numpy", "numba", "BLAS", "threading layer", "bfloat16"):
        assert word in result.stdout


def test_unknown_key_on_command_line_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--train.batchsize", "3"])
    assert "--train.batchsize" in capsys.readouterr().err


def test_mlp_on_digits_reaches_97_percent():
    """A real data set: the digits preset (MLP 64-256-128-10, AdamW) on scikit-learn's 8x8 digits."""
    pytest.importorskip("sklearn")
    run = build_run(build_config(preset="digits"))
    result = run.trainer.fit(run.train_data, epochs=run.config["train"]["epochs"],
                             batch_size=run.config["train"]["batch_size"], eval_data=run.eval_data,
                             progress=False)
    assert result["eval_accuracy"] >= 0.97, result


def test_resuming_a_finished_run_changes_nothing_unless_the_limits_are_raised(tmp_path, capsys):
    from npcpu.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(EXAMPLES / "tiny.toml"), "--run-dir", str(run_dir),
                 "--train.epochs", "1", "--threads", "1", "--progress", "lines"]) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run_dir), "--progress", "lines"]) == 0
    assert "the run is complete: it is at step 16" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    assert main(["train", "--resume", str(run_dir), "--train.epochs", "2", "--progress",
                 "lines"]) == 0
    assert "the run is complete" not in capsys.readouterr().err
    assert list_checkpoints(run_dir)[-1].name == "step-000032"
