"""Language-model training end to end: the Markov source's entropy floor, real text (the Python
standard library's own source) through prepare-text, train, eval and generate, and bad input."""

import json
import string
import textwrap

import numpy as np
import pytest

from npcpu.cli import main
from npcpu.config import ConfigError, build_config
from npcpu.models.gpt import GPT, GPTConfig
from npcpu.nn.losses import CrossEntropyLoss
from npcpu.optim.adam import AdamW
from npcpu.text import SyntheticText, TextDataError, TextDataset, prepare_text
from npcpu.train.build import build_run
from npcpu.train.lm import LanguageModelBatches, LanguageModelTrainer

# Source files every Python installation has, written by others (not for this test).
STDLIB_FILES = [textwrap.__file__, string.__file__]


def tiny_trainer(data, accumulation_steps=1, seed=0):
    model = GPT(GPTConfig(data.vocab_size, data.block_size, 1, 2, 16), seed=seed)
    optimizer = AdamW(model.optimizer_groups(0.1), lr=3e-3)
    return LanguageModelTrainer(model, CrossEntropyLoss(), optimizer,
                                accumulation_steps=accumulation_steps, seed=seed)


def test_accumulation_gives_the_gradient_of_the_whole_batch():
    """k micro-batches of B windows == one batch of k * B windows (the same windows, the loss a
    mean over all their tokens), including padded (ignored) targets counted out of the mean."""
    data = SyntheticText(10, 12, seed=3)
    grads = []
    for k, batch in ((1, 8), (4, 2)):
        trainer = tiny_trainer(data, accumulation_steps=k)
        loader = LanguageModelBatches(data, batch, 1000)
        runner = trainer.make_runner(loader, 1)
        window = runner._next_window()
        for x, y in window:
            y[:, -3:] = -100  # padding targets: outside the mean
        loss, items = runner.forward_backward(window)
        assert items == 8 * 9
        grads.append((loss, [p.grad.copy() for p in trainer.model.parameters()]))
    (loss1, g1), (loss4, g4) = grads
    assert loss1 == pytest.approx(loss4, rel=1e-6)
    for a, b in zip(g1, g4):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_gpt_synthetic_small_variant_approaches_the_entropy_floor():
    """A smaller variant of the gpt-synthetic preset (an order-1 source: CI time) ends within
    0.1 nats of the floor; the preset itself is measured in bench/bench_lm.py."""
    config = build_config(preset="gpt-synthetic", overrides={
        "data": {"order": 1, "vocab_size": 12, "eval_size": 64},
        "model": {"n_layer": 1, "n_embd": 32, "block_size": 16},
        "train": {"max_steps": 150, "eval_every": None, "checkpoint_every": None}})
    run = build_run(config)
    result = run.fit(None, progress=False)
    assert result["eval_excess_loss"] < 0.1, result
    assert result["eval_loss"] < 0.8 * run.eval_data.unigram_entropy()


@pytest.fixture(scope="module")
def stdlib_text(tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib")
    assert main(["prepare-text", *STDLIB_FILES, "--out", str(out / "data"),
                 "--tokenizer", "char"]) == 0
    return out


def test_python_source_prepared_trained_evaluated_and_sampled(stdlib_text, capsys):
    data_dir, run_dir = stdlib_text / "data", stdlib_text / "run"
    assert main(["train", "--preset", "gpt-char", "--data.path", str(data_dir),
                 "--run-dir", str(run_dir), "--model.n_layer", "1", "--model.n_embd", "48",
                 "--model.block_size", "32", "--train.batch_size", "16",
                 "--train.max_steps", "400", "--optim.lr", "0.006", "--schedule.warmup_steps",
                 "10", "--train.eval_every", "400", "--progress", "lines",
                 "--threads", "2"]) == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    final = [r for r in records if r["kind"] == "eval"][-1]
    unigram = TextDataset(data_dir, 32).unigram_entropy("val")
    assert final["eval_loss"] < unigram - 0.7, (final, unigram)
    assert final["eval_bits_per_byte"] == pytest.approx(final["eval_loss"] / np.log(2), rel=0.05)

    assert main(["eval", str(run_dir)]) == 0
    assert "perplexity" in capsys.readouterr().out

    assert main(["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "60",
                 "--seed", "1"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("def ") and len(sample) == len("def ") + 60 + 1  # one char a token

    # the run's data directory prepared again with another tokenizer: refused, both named
    prepare_text(STDLIB_FILES, stdlib_text / "bytes", tokenizer="byte")
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["path"] = str(stdlib_text / "bytes")
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(run_dir)]) == 2
    assert "another tokenizer than the run's (directory: byte" in capsys.readouterr().err


def test_data_made_by_another_tokenizer_is_refused(stdlib_text, tmp_path):
    other = tmp_path / "bytes"
    prepare_text(STDLIB_FILES, other, tokenizer="byte")
    char_tokenizer = TextDataset(stdlib_text / "data", 8).tokenizer
    with pytest.raises(TextDataError, match="another tokenizer"):
        TextDataset(other, 8, tokenizer=char_tokenizer)


def test_block_size_longer_than_the_validation_split(stdlib_text, capsys):
    run_dir = stdlib_text / "too-long"
    assert main(["train", "--preset", "gpt-char", "--data.path", str(stdlib_text / "data"),
                 "--model.block_size", "100000", "--run-dir", str(run_dir)]) == 2
    assert "block_size 100000" in capsys.readouterr().err
    assert not run_dir.exists()  # no run directory left half-written


def test_ids_beyond_the_vocabulary(stdlib_text, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        (broken / name).write_bytes((stdlib_text / "data" / name).read_bytes())
    ids = np.memmap(broken / "val.bin", dtype=np.uint16, mode="r+")
    ids[5] = 60000
    ids.flush()
    with pytest.raises(TextDataError, match="token id 60000 at token 5"):
        TextDataset(broken, 8)


GUIDE_YAML = """\
model:
  vocab_size: 64
  d_model: 32
  n_heads: 2
  n_layers: 1
  max_seq_len: 16
  d_ff: 128
  dropout: 0.0
  gradient_checkpointing: false
training:
  batch_size: 4
  gradient_accumulation_steps: 2
  learning_rate: 8.0e-4
  num_epochs: 1
  warmup_steps: 10
  max_grad_norm: 1.0
  weight_decay: 0.01
  logging_steps: 5
  eval_steps: 50
  save_steps: 50
  use_amp: true
  dataloader_pin_memory: true
  dataloader_num_workers: 4
device: "cpu"
"""


def test_guide_yaml_config_loads(tmp_path, capsys):
    path = tmp_path / "cpu_small.yaml"
    path.write_text(GUIDE_YAML)
    config = build_config(files=[path], overrides={"data": {"kind": "synthetic_text"}})
    assert config["model"] | {"kind": "gpt", "n_embd": 32, "n_head": 2, "n_layer": 1,
                              "block_size": 16, "vocab_size": 64} == config["model"]
    assert (config["train"]["batch_size"], config["train"]["accumulation_steps"],
            config["train"]["epochs"], config["train"]["max_steps"]) == (4, 2, 1, None)
    assert (config["optim"]["name"], config["optim"]["lr"], config["train"]["clip_grad_norm"],
            config["train"]["checkpoint_every"]) == ("adamw", 8e-4, 1.0, 50)
    err = capsys.readouterr().err
    for key in ("use_amp", "dataloader_pin_memory", "dataloader_num_workers"):
        assert sum(key in line and "does not apply" in line for line in err.splitlines()) == 1
    run = build_run(config)
    assert run.trainer.model.config.vocab_size == 64  # padded beyond the source's 16 ids


@pytest.mark.parametrize("change, message", [
    (("d_model: 32", "d_model: thirty-two"), r"model\.d_model .*must be an integer"),
    (("learning_rate: 8.0e-4", "learning_rat: 8.0e-4"), "unknown key 'learning_rat'"),
    (("device: \"cpu\"", "device: \"cuda\""), "CPU only"),
    (("d_ff: 128", "d_ff: 100"), "4 \\* d_model"),
    (("device: \"cpu\"", "device: \"cpu\"\noptimizer: {}"), "unknown key 'optimizer'"),
])
def test_guide_yaml_errors_name_the_key(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(GUIDE_YAML.replace(*change))
    with pytest.raises(ConfigError, match=message):
        build_config(files=[path], overrides={"data": {"kind": "synthetic_text"}})


def test_a_gpt_needs_text_data():
    with pytest.raises(ConfigError, match="cannot train on"):
        build_config(overrides={"model": {"kind": "gpt"}})
    with pytest.raises(ConfigError, match="needs data.path"):
        build_run(build_config(preset="gpt-char"))


def test_early_stopping_watches_the_validation_loss():
    """With a zero learning rate the validation loss never improves: patience 1 stops the run
    at the second evaluation."""
    config = build_config(preset="gpt-synthetic", overrides={
        "model": {"n_layer": 1, "n_embd": 16, "block_size": 8},
        "data": {"eval_size": 8}, "optim": {"lr": 0.0},
        "train": {"max_steps": 50, "eval_every": 5, "checkpoint_every": None,
                  "early_stopping_patience": 1}})
    run = build_run(config)
    run.fit(None, progress=False)
    assert run.trainer.step == 10
