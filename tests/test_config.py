from pathlib import Path

import pytest

from npcpu.config import (PRESETS, SCHEMA, ConfigError, build_config, defaults, from_json,
                          parse_cli_value, to_json)
from npcpu.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_defaults_pass_validation_and_every_preset_builds():
    for preset in PRESETS:
        config = build_config(preset=preset)
        assert set(config) == set(SCHEMA)


def test_example_default_toml_is_the_embedded_default():
    assert build_config(files=[EXAMPLES / "default.toml"]) == build_config()


def test_toml_then_cli_override_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbatch_size = 32\nmax_steps = 7\n")
    config = build_config(files=[path], overrides={"train": {"batch_size": 16}})
    assert config["train"]["batch_size"] == 16 and config["train"]["max_steps"] == 7


@pytest.mark.parametrize("text, message", [
    ("[train]\nbatchsize = 3\n", "unknown key train.batchsize"),
    ("[trian]\nbatch_size = 3\n", "unknown section 'trian'"),
    ("[train]\nbatch_size = '3'\n", "'train.batch_size' must be an integer"),
    ("[train]\nbatch_size = 0\n", "'train.batch_size' must be >= 1"),
    ("[train]\nprecision = 'fp8'\n", "'train.precision' must be one of"),
    ("[optim]\nlr = -1.0\n", "'optim.lr' must be >= 0.0"),
    ("[optim]\nbetas = [0.9, 1.0]\n", "'optim.betas' must be two numbers in [0, 1)"),
    ("[model]\nhidden = []\n", "'model.hidden' must be a non-empty list"),
    ("[freeze]\nenabled = 1\n", "'freeze.enabled' must be true or false"),
    ("[data]\nkind = 'mnist'\n", "needs data.path"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        build_config(files=[path])
    assert message in str(info.value)


def test_cli_values_are_parsed_by_field_type():
    assert parse_cli_value("model.hidden", "64,32") == [64, 32]
    assert parse_cli_value("train.max_steps", "none") is None
    assert parse_cli_value("freeze.enabled", "false") is False
    assert parse_cli_value("optim.lr", "1e-3") == 1e-3
    with pytest.raises(ConfigError, match="--train.batch_size: cannot read 'x' as int"):
        parse_cli_value("train.batch_size", "x")


def test_json_round_trip():
    config = build_config(preset="digits")
    assert from_json(to_json(config), "saved") == config


def test_cli_rejects_bad_key_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--run-dir", str(run_dir), "--train.batch_size", "-5"])
    assert code == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert not run_dir.exists()


def test_cli_print_config(capsys):
    assert main(["train", "--preset", "mlp52m", "--print-config"]) == 0
    assert '"hidden": [\n      4096' in capsys.readouterr().out


def test_defaults_are_fresh_copies():
    a = defaults()
    a["model"]["hidden"].append(1)
    assert defaults()["model"]["hidden"] == SCHEMA["model"]["hidden"].default


def test_example_digits_toml_is_the_digits_preset():
    assert build_config(files=[EXAMPLES / "digits.toml"]) == build_config(preset="digits")
