"""prepare-text: nanoGPT's bins from real text, streaming equals in-memory, bad inputs."""

import inspect
import json
import json.decoder
import json.encoder
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npcpu.cli import main
from npcpu.text.prepare import TextDataError, prepare_text, read_chunks
from npcpu.text.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer

try:
    import tokenizers  # noqa: F401
    KINDS = ["char", "byte", "bpe"]
except ImportError:
    KINDS = ["char", "byte", pytest.param("bpe", marks=pytest.mark.skip(
        reason="the optional `tokenizers` package is not installed"))]

# Real text no one here wrote, on every machine: the standard library's own json package.
STDLIB_FILES = [inspect.getsourcefile(m) for m in (json, json.decoder, json.encoder)]


@pytest.fixture(scope="module")
def trained_bpe():
    if "bpe" not in KINDS:
        pytest.skip("the optional `tokenizers` package is not installed")
    text = "".join(open(p, encoding="utf-8").read() for p in STDLIB_FILES)
    # lines with trailing spaces, so that merges across a space and a line break exist
    extra = "trailing \n\nspaces  \n\n\tand\u00a0\n\u3000Wörter \u2028 \U0001F642's\n" * 50
    return BPETokenizer.train([text, extra], 500)


def read_bins(out_dir, dtype=np.uint16):
    return (np.fromfile(out_dir / "train.bin", dtype=dtype),
            np.fromfile(out_dir / "val.bin", dtype=dtype))


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_char_bins_are_nanogpts(tmp_path):
    """nanoGPT's shakespeare_char prepare, restated: vocabulary sorted(set(data)), ids as uint16,
    train = data[:int(n * 0.9)], val = the rest."""
    path = STDLIB_FILES[0]
    data = open(path, encoding="utf-8").read()
    stoi = {c: i for i, c in enumerate(sorted(set(data)))}
    n = len(data)
    expected_train = np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16)
    expected_val = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)

    meta = prepare_text([path], tmp_path / "out", "char")
    assert (tmp_path / "out" / "train.bin").read_bytes() == expected_train.tobytes()
    assert (tmp_path / "out" / "val.bin").read_bytes() == expected_val.tobytes()
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("char", len(stoi), "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(expected_train), len(expected_val))
    assert meta["sources"] == [{"path": os.path.realpath(path), "bytes": os.path.getsize(path)}]
    assert load_tokenizer(tmp_path / "out" / "tokenizer.json").chars == sorted(stoi)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_several_files_are_their_ids_in_order(tmp_path, kind):
    vocab_size = 600 if kind == "bpe" else None
    meta = prepare_text(STDLIB_FILES, tmp_path / "out", kind, vocab_size, val_fraction=0.2)
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    ids = np.concatenate([tokenizer.encode(open(p, encoding="utf-8").read())
                          for p in STDLIB_FILES])
    train, val = read_bins(tmp_path / "out")
    assert len(train) == int(len(ids) * 0.8) and meta["val_tokens"] == len(val)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    assert tokenizer.decode(np.concatenate([train, val])) == "".join(
        open(p, encoding="utf-8").read() for p in STDLIB_FILES)
    assert meta["vocab_size"] == tokenizer.vocab_size
    if kind == "bpe":
        assert tokenizer.vocab_size == 600
        assert len(ids) < sum(source["bytes"] for source in meta["sources"])  # merges happened


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_bytes", [5, 64])
def test_a_file_larger_than_the_chunk_gives_the_bins_of_the_text_in_memory(tmp_path, kind,
                                                                           chunk_bytes):
    # Multi-byte characters fall across chunk edges; runs of spaces and blank lines test BPE's cuts.
    text = open(STDLIB_FILES[1], encoding="utf-8").read()[:3000]
    text = text.replace("e", "\u00e9", 40).replace("a", "\U0001F642", 25) + "\n\n  end  \n"
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    vocab_size = 300 if kind == "bpe" else None
    prepare_text([path], tmp_path / "whole", kind, vocab_size)
    prepare_text([path], tmp_path / "chunked", kind, vocab_size, chunk_bytes=chunk_bytes)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "whole" / name).read_bytes() == \
            (tmp_path / "chunked" / name).read_bytes(), name
    tokenizer = load_tokenizer(tmp_path / "whole" / "tokenizer.json")
    train, val = read_bins(tmp_path / "whole")
    np.testing.assert_array_equal(np.concatenate([train, val]), tokenizer.encode(text))


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    points = [p for p in range(0x100, 0x100 + 70_000) if not 0xD800 <= p < 0xE000]
    text = "".join(map(chr, points))
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare_text([tmp_path / "wide.txt"], tmp_path / "out", "char")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(points) > 65536
    train, val = read_bins(tmp_path / "out", np.uint32)
    np.testing.assert_array_equal(np.concatenate([train, val]), np.arange(len(points)))


def test_given_tokenizer_json_is_used_as_it_is(tmp_path):
    CharTokenizer(list("abc\n")).save(tmp_path / "tok.json")
    (tmp_path / "in.txt").write_text("abcabc\ncab\n" * 10, encoding="utf-8")
    meta = prepare_text([tmp_path / "in.txt"], tmp_path / "out", str(tmp_path / "tok.json"))
    assert meta["vocab_size"] == 4
    train, _ = read_bins(tmp_path / "out")
    assert train[:7].tolist() == [0, 1, 2, 0, 1, 2, 3]


def write_bytes(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, chunk_bytes, message", [
    (b"", 64, r"empty\.txt: the file is empty"),
    (b"text\x00\x01\x02binary", 64, r"bin\.txt: a NUL byte at byte offset 4"),
    (b"hello \xff world", 64, r"latin\.txt: not UTF-8 text: byte 0xff at byte offset 6"),
    (b"0123456789" * 3 + b"caf\xe9 au lait", 8, r"latin\.txt: .* at byte offset 33"),
    (b"ends in a cut character \xe2\x82", 8, r"latin\.txt: .* byte 0xe2 at byte offset 24"),
])
def test_bad_input_names_the_file_and_offset_and_writes_nothing(tmp_path, data, chunk_bytes,
                                                                message):
    name = "empty.txt" if not data else "bin.txt" if b"\x00" in data else "latin.txt"
    good = write_bytes(tmp_path, "good.txt", b"some good text\n" * 20)
    bad = write_bytes(tmp_path, name, data)
    for kind in ("char", "byte"):
        with pytest.raises(TextDataError, match=message):
            prepare_text([good, bad], tmp_path / "out", kind, chunk_bytes=chunk_bytes)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_error_while_encoding_leaves_no_partial_directory(tmp_path):
    (tmp_path / "in.txt").write_text("abc" * 100 + "z", encoding="utf-8")
    with pytest.raises(ValueError, match="character 'z'"):
        prepare_text([tmp_path / "in.txt"], tmp_path / "out", CharTokenizer(list("abc")))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_output_of_another_tokenizer_is_refused_and_left_alone(tmp_path):
    path = STDLIB_FILES[0]
    prepare_text([path], tmp_path / "out", "char")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(TextDataError, match=r"made by the 'char' tokenizer, not 'byte'"):
        prepare_text([path], tmp_path / "out", "byte")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_bins_of_unknown_origin_are_refused(tmp_path):
    (tmp_path / "out").mkdir()
    np.zeros(10, dtype=np.uint16).tofile(tmp_path / "out" / "train.bin")
    with pytest.raises(TextDataError, match="without a meta.json"):
        prepare_text([STDLIB_FILES[0]], tmp_path / "out", "char")


def test_same_tokenizer_again_replaces_its_files_and_keeps_others(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "a.txt").write_text("aaaa bbbb\n" * 10)
    (tmp_path / "b.txt").write_text("xyz\n" * 10)
    prepare_text([tmp_path / "a.txt"], tmp_path / "out", "char")
    meta = prepare_text([tmp_path / "b.txt"], tmp_path / "out", "char")
    assert meta["vocab_size"] == 4 and meta["train_tokens"] + meta["val_tokens"] == 40
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "notes.txt", "tokenizer.json", "train.bin", "val.bin"]
    assert leftovers(tmp_path) == []


def test_argument_errors(tmp_path):
    path = STDLIB_FILES[0]
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        prepare_text([path], tmp_path / "out", "char", val_fraction=1.0)
    with pytest.raises(TextDataError, match="applies to the bpe tokenizer only"):
        prepare_text([path], tmp_path / "out", "char", vocab_size=500)
    with pytest.raises(TextDataError, match="the bpe tokenizer needs --vocab-size"):
        prepare_text([path], tmp_path / "out", "bpe")
    with pytest.raises(TextDataError, match=r"tokenizer must be one of .* got 'words'"):
        prepare_text([path], tmp_path / "out", "words")
    with pytest.raises(TextDataError, match="nope.txt: no such file"):
        prepare_text([tmp_path / "nope.txt"], tmp_path / "out", "char")
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(TextDataError, match="3 tokens are too few to split"):
        prepare_text([tmp_path / "short.txt"], tmp_path / "out", "char")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_main_runs_the_command_line_and_shows_progress(tmp_path, capsys):
    assert main(["prepare-text", STDLIB_FILES[0], "--out", str(tmp_path / "out"), "--tokenizer", "byte",
                 "--val-fraction", "0.25"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["val_fraction"] == 0.25
    assert "train and" in capsys.readouterr().out
    prepare_text([STDLIB_FILES[0]], tmp_path / "bar", "char", progress=True)
    assert "encode" in capsys.readouterr().err


# Text made of what decides byte-level BPE's pre-tokenization: runs of every kind of space and
# line break (Unicode ones included), words, digits, punctuation, contractions, wide characters.
_PIECES = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2028", "\u0085", "\u3000", "\x1c",
           "word", "Wörter", "42", "3.14", "'s", "'ll", "...", "#", "\u00e9", "\U0001F642", "x"]
bpe_text = st.lists(st.sampled_from(_PIECES), max_size=120).map("".join)


@pytest.mark.skipif("bpe" not in KINDS, reason="the optional `tokenizers` package is not "
                                                "installed")
@settings(max_examples=150, deadline=None)
@given(text=bpe_text, chunk_bytes=st.integers(1, 40))
def test_bpe_ids_do_not_depend_on_the_chunk_size(trained_bpe, text, chunk_bytes):
    if not text:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.txt")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        chunks = list(read_chunks(path, chunk_bytes, cut_anywhere=False))
    assert "".join(chunks) == text
    np.testing.assert_array_equal(np.concatenate([trained_bpe.encode(c) for c in chunks]),
                                  trained_bpe.encode(text))
