"""Property-based fuzzing of what npcpu reads from files: IDX, text bins with their meta.json,
tokenizer files, checkpoint files (safetensors headers and bytes, state.json). Each hostile file
gets a clear error naming the file, or a correct result; never a crash or an allocation the
file does not justify (tests/fuzzing.py: the outcomes and the table)."""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, attempt, table_fixture
from npcpu.checkpoint import load_checkpoint, save_checkpoint
from npcpu.checkpoint.tensors import parse_safetensors
from npcpu.data.mnist import read_idx, write_idx
from npcpu.text.dataset import TextDataset
from npcpu.text.tokenizers import CharTokenizer, load_tokenizer

table = table_fixture("IDX files", "text bins and meta.json", "tokenizer files",
                      "safetensors headers", "checkpoint state.json", "checkpoint tensor bytes")

MEMORY = 1 << 20  # allowance beyond a few times the file's size: no allocation from a header's claim

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12)
nasty_json = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),  # deeply nested
    st.integers(1, 100_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.binary(max_size=64),                                                  # not UTF-8, not JSON
    st.just(b"1e400"), st.just(b'"\\ud800"'), st.just(b"NaN"))


def tmp_dir(seed: int) -> Path:
    import tempfile
    return Path(tempfile.mkdtemp(prefix=f"npcpu-fuzz-{seed}-"))


# -- IDX ----------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=40), st.sampled_from((0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07)),
       st.lists(st.integers(0, 2**32 - 1), max_size=4), st.booleans())
def test_idx_files(tail, code, dims, consistent):
    path = tmp_dir(0) / "data.idx"
    header = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    body = tail
    if consistent and code in (0x08, 0x09) and np.prod(dims, dtype=object) <= 64:
        body = bytes(int(np.prod(dims, dtype=object)))
    path.write_bytes(header + body)
    ok, array = attempt("IDX files", lambda: read_idx(path), str(path),
                        memory_limit=4 * (len(header) + len(body)) + MEMORY)
    if ok:
        assert array.shape == tuple(dims)


@FUZZ
@given(st.binary(max_size=64))
def test_idx_files_of_random_bytes(raw):
    path = tmp_dir(1) / "random.idx"
    path.write_bytes(raw)
    attempt("IDX files", lambda: read_idx(path), str(path), memory_limit=4 * len(raw) + MEMORY)


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", array)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), array)


# -- text bins and tokenizer files ----------------------------------------------------------------------
def text_dir(meta: dict | bytes, train: bytes, val: bytes, tokenizer: bytes | None = None) -> Path:
    directory = tmp_dir(2)
    (directory / "meta.json").write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    (directory / "train.bin").write_bytes(train)
    (directory / "val.bin").write_bytes(val)
    (directory / "tokenizer.json").write_bytes(
        tokenizer if tokenizer is not None else CharTokenizer("abcd").to_json().encode())
    return directory


GOOD_META = {"format": "npcpu-text", "version": 1, "tokenizer": "char", "vocab_size": 4,
             "dtype": "uint16", "train_tokens": 20, "val_tokens": 10, "val_fraction": 0.33,
             "sources": []}


@st.composite
def text_bins(draw):
    """(train, val) bytes: ids of the vocabulary of 4 (one maybe out of it), or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=60)), draw(st.binary(max_size=30))
    train = np.array(draw(st.lists(st.integers(0, 3), min_size=20, max_size=20)), np.uint16)
    val = np.array(draw(st.lists(st.integers(0, 3), min_size=10, max_size=10)), np.uint16)
    if draw(st.booleans()):
        train[draw(st.integers(0, 19))] = draw(st.integers(4, 2**16 - 1))
    return train.tobytes(), val.tobytes()


@FUZZ
@given(st.sampled_from(sorted(GOOD_META)),
       st.one_of(json_values, st.just("uint32"), st.just("float32"), st.just(None)),
       text_bins(), st.integers(1, 12))
def test_text_bins_and_their_meta(key, value, bins, block_size):
    from npcpu.text.dataset import META_FORMAT
    train, val = bins
    meta = {**GOOD_META, "format": META_FORMAT}
    if value is not None:  # None: the meta.json as prepare-text writes it
        meta[key] = value
    directory = text_dir(meta, train, val)
    ok, data = attempt("text bins and meta.json", lambda: TextDataset(directory, block_size),
                       str(directory), memory_limit=8 * (len(train) + len(val)) + MEMORY)
    if ok:  # every id it serves is in the vocabulary
        x, y = data.batch(0, 2)
        assert x.shape == (2, block_size) and x.max() < data.vocab_size and y.min() >= 0


@FUZZ
@given(nasty_json, st.integers(1, 4))
def test_text_meta_that_is_not_json_or_not_an_object(meta, block_size):
    directory = text_dir(meta, bytes(40), bytes(20))
    attempt("text bins and meta.json", lambda: TextDataset(directory, block_size), str(directory))


@FUZZ
@given(st.one_of(nasty_json,
                 json_values.map(lambda v: json.dumps({"npcpu_tokenizer": "char", "chars": v}).encode()),
                 json_values.map(lambda v: json.dumps({"npcpu_tokenizer": v}).encode()),
                 json_values.map(lambda v: json.dumps({"model": v}).encode()),
                 st.lists(st.characters(), unique=True, max_size=8).map(
                     lambda chars: json.dumps({"npcpu_tokenizer": "char", "chars": chars}).encode())))
def test_tokenizer_files(raw):
    path = tmp_dir(3) / "tokenizer.json"
    path.write_bytes(raw)
    ok, tokenizer = attempt("tokenizer files", lambda: load_tokenizer(path), str(path))
    if ok:  # it round-trips what it can encode
        text = "".join(getattr(tokenizer, "chars", ["a"])[:3])
        assert tokenizer.decode(tokenizer.encode(text)) == text


# -- checkpoints ------------------------------------------------------------------------------------------
def small_checkpoint() -> Path:
    run = tmp_dir(4)
    state = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                       "b": np.ones(3, np.float16)}, "step": 3, "note": "x"}
    return save_checkpoint(run, state, step=3)


def reseal(directory: Path, tensors: bytes | None = None, document: bytes | None = None) -> None:
    """Write new tensors and/or state.json bytes, keeping the recorded SHA-256 consistent."""
    if tensors is not None:
        (directory / "tensors.safetensors").write_bytes(tensors)
        record = json.loads((directory / "state.json").read_text())
        record["tensors_sha256"] = hashlib.sha256(tensors).hexdigest()
        (directory / "state.json").write_text(json.dumps(record))
    if document is not None:
        (directory / "state.json").write_bytes(document)


@st.composite
def safetensors_files(draw):
    """A safetensors file whose header is valid, wrong in one field, or junk."""
    data = draw(st.binary(min_size=0, max_size=48))
    entry = {"dtype": draw(st.sampled_from(("F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3",
                                            "C64", "", "f32"))),
             "shape": draw(st.one_of(st.lists(st.integers(-2, 5), max_size=3),
                                     st.lists(st.integers(-2**64, 2**64), max_size=2),
                                     json_values)),
             "data_offsets": draw(st.one_of(st.lists(st.integers(-4, 60), min_size=2, max_size=2),
                                            st.lists(st.integers(-2**65, 2**65), min_size=2,
                                                     max_size=2), json_values))}
    header = {"a": entry}
    if draw(st.booleans()):  # a second tensor, maybe overlapping the first
        begin = draw(st.integers(0, 8))
        header["b"] = {"dtype": "U8", "shape": [4], "data_offsets": [begin, begin + 4]}
    text = draw(st.one_of(st.just(json.dumps(header).encode()), nasty_json))
    length = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    return length.to_bytes(8, "little") + text + data


@FUZZ
@given(safetensors_files())
def test_safetensors_headers(blob):
    where = Path("fuzzed.safetensors")
    ok, arrays = attempt("safetensors headers", lambda: parse_safetensors(bytearray(blob), where),
                         "fuzzed.safetensors", memory_limit=4 * len(blob) + MEMORY)
    if ok:
        views = list(arrays.values())
        for i, a in enumerate(views):
            assert a.nbytes <= len(blob)
            for b in views[i + 1:]:
                assert not np.shares_memory(a, b), "two tensors share bytes"


@st.composite
def changed_tensor_files(draw):
    """A checkpoint's own tensors file with bytes changed (header or data), or a fuzzed one."""
    directory = small_checkpoint()
    if draw(st.booleans()):
        return directory, draw(safetensors_files())
    blob = bytearray((directory / "tensors.safetensors").read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return directory, bytes(blob)


@FUZZ
@given(changed_tensor_files())
def test_checkpoint_tensor_bytes(case):
    directory, blob = case
    reseal(directory, tensors=blob)
    ok, loaded = attempt("checkpoint tensor bytes", lambda: load_checkpoint(directory),
                         str(directory), memory_limit=8 * len(blob) + MEMORY)
    if ok:  # the arrays hold the file's bytes as the header places them
        state, _ = loaded
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
        for name, array in (("model.w", state["model"]["w"]), ("model.b", state["model"]["b"])):
            begin, end = header[name]["data_offsets"]
            assert array.tobytes() == blob[8 + header_len + begin:8 + header_len + end]


@FUZZ
@given(st.one_of(nasty_json, st.sampled_from(("step", "state", "metric", "config", "format_version",
                                              "tensors_sha256")).flatmap(
    lambda key: json_values.map(lambda v: (key, v)))))
def test_checkpoint_state_json(change):
    directory = small_checkpoint()
    if isinstance(change, tuple):
        record = json.loads((directory / "state.json").read_text())
        record[change[0]] = change[1]
        document = json.dumps(record).encode()
    else:
        document = change
    reseal(directory, document=document)
    ok, loaded = attempt("checkpoint state.json", lambda: load_checkpoint(directory), str(directory))
    if ok:
        state, _ = loaded
        assert isinstance(state, dict)
