"""Property-based fuzzing of configuration files: TOML and the YAML guide format with wrong
types, huge numbers, unknown keys, junk bytes and deep nesting. Each gets a ConfigError naming
the file or key, or a configuration that passes validation again after a JSON round trip
(tests/fuzzing.py: the outcomes and the table). An error about one file names it; one about
keys that disagree across the merged configuration ("config: model.kind 'gpt' cannot train on
data.kind 'synthetic'") names the keys."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, attempt, table_fixture
from npcpu.config import SCHEMA, build_config, from_json, to_json

table = table_fixture("config TOML", "config YAML", "config.json of a run")

values = st.one_of(
    st.integers(-2**80, 2**80), st.integers(-3, 300), st.floats(), st.booleans(),
    st.text(max_size=6), st.sampled_from(("fp32", "bf16", "gpt", "mlp", "adamw", "sgd", "cosine")),
    st.lists(st.integers(-2**70, 2**70), max_size=3), st.lists(st.floats(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def sections(draw):
    """{section: {key: value}}: mostly real sections and keys, with hostile values."""
    result = {}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(SCHEMA))) if draw(st.integers(0, 3)) else \
            draw(st.text(max_size=5))
        keys = sorted(SCHEMA.get(section, {})) or ["x"]
        fields = result.setdefault(section, {})
        for _ in range(draw(st.integers(1, 3))):
            known = draw(st.integers(0, 3)) > 0  # an unknown key one time in four
            key = draw(st.sampled_from(keys)) if known else draw(st.text(max_size=5))
            field = SCHEMA.get(section, {}).get(key)
            if field is not None and field.default is not None and draw(st.booleans()):
                fields[key] = draw(in_range(field))  # a value the field accepts
            else:
                fields[key] = draw(values)
    return result


@st.composite
def accepted_sections(draw):
    """{section: {key: value}} of known keys with values their fields accept."""
    section = draw(st.sampled_from(sorted(SCHEMA)))
    keys = [k for k, f in SCHEMA[section].items() if f.default is not None]
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    return {section: {key: draw(in_range(SCHEMA[section][key])) for key in chosen}}


def in_range(field):
    """Values `field` accepts (near its default)."""
    if field.type == "int":
        low = int(field.min if field.min is not None else 0)
        return st.integers(low, max(low, int(field.max)) if field.max is not None else low + 64)
    if field.type == "float" and field.min is not None and field.max is not None:
        return st.floats(field.min, field.max)
    return st.just(field.default)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_text(config: dict) -> bytes:
    lines = []
    for section, fields in config.items():
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(key)} = {toml_value(value)}" for key, value in fields.items()]
    return "\n".join(lines).encode()


junk = st.one_of(
    st.binary(max_size=40),
    st.integers(1, 5000).map(lambda depth: b"[train]\nbatch_size = " + b"[" * depth + b"]" * depth),
    st.integers(300, 5000).map(lambda digits: b"[train]\nbatch_size = " + b"9" * digits),
    st.just(b"[train]\nbatch_size = 1e999"), st.just(b"\xff\xfe[train]"))


def write(text: bytes, suffix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="npcpu-fuzz-config-")) / f"config{suffix}"
    path.write_bytes(text)
    return path


def check_loaded(config: dict) -> None:
    """A configuration that loaded passes the checks again after the JSON round trip a run's
    config.json takes."""
    assert from_json(to_json(config), "round trip") == config


@FUZZ
@given(st.one_of(sections().map(toml_text), accepted_sections().map(toml_text), junk))
def test_toml_configs(text):
    path = write(text, ".toml")
    ok, config = attempt("config TOML", lambda: build_config(files=[path]), str(path), "config:")
    if ok:
        check_loaded(config)


GUIDE_KEYS = {"model": ("d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len", "dropout",
                        "d_ff", "gradient_checkpointing"),
              "training": ("batch_size", "learning_rate", "num_epochs", "max_steps",
                           "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                           "gradient_clip", "mixed_precision", "seed")}


@st.composite
def guide_documents(draw):
    document = {}
    for top in draw(st.lists(st.sampled_from(("model", "training", "device", "other")),
                             min_size=1, max_size=3, unique=True)):
        if top == "device":
            document[top] = draw(st.sampled_from(("cpu", "cuda", 3)))
        elif top == "other":
            document[top] = draw(values)
        else:
            document[top] = {draw(st.one_of(st.sampled_from(GUIDE_KEYS[top]), st.text(max_size=4))):
                             draw(st.one_of(values, st.integers(1, 64), st.floats(0, 0.5)))
                             for _ in range(draw(st.integers(1, 3)))}
    return document


yaml_junk = st.one_of(
    junk,
    st.just(b"a: &a [1, 1]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: &d [*c, *c]\nmodel: [*d, *d]"),
    st.just(b"model: !!python/object/apply:os.system ['true']"),
    st.integers(1, 5000).map(lambda depth: b"model: " + b"[" * depth + b"]" * depth))


@FUZZ
@given(st.one_of(guide_documents(), yaml_junk))
def test_yaml_guide_configs(document):
    yaml = pytest.importorskip("yaml")
    text = document if isinstance(document, bytes) else yaml.safe_dump(document).encode()
    path = write(text, ".yaml")
    # a guide config describes a gpt; the data comes from the command line
    ok, config = attempt("config YAML", lambda: build_config(
        files=[path], overrides={"data": {"kind": "synthetic_text"}}), str(path), "config:")
    if ok:
        check_loaded(config)


@FUZZ
@given(st.one_of(sections(), accepted_sections()))
def test_a_run_config_json_edited_by_hand(edit):
    config = build_config()
    for section, fields in edit.items():
        config.setdefault(section, {}).update(fields) if isinstance(config.get(section), dict) \
            else config.__setitem__(section, fields)
    text = json.dumps(config)
    ok, loaded = attempt("config.json of a run", lambda: from_json(text, "config.json"),
                         "config.json")
    if ok:
        check_loaded(loaded)
