"""TextDataset: deterministic training windows, evaluation covering the split once, errors."""

import inspect
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npcpu.text.dataset import (IGNORE_INDEX, TextDataset, adopt_bins, fixed_windows,
                                language_model_metrics, unigram_entropy)
from npcpu.text.prepare import TextDataError, prepare_text
from npcpu.text.sampling import TRAIN_WINDOWS, window_starts
from npcpu.text.tokenizers import ByteTokenizer, CharTokenizer
from test_synthetic import uniform_twin

SOURCE = inspect.getsourcefile(json)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "char"
    prepare_text([SOURCE], out, "char")
    return out


def test_window_starts_match_twin():
    for first, count in ((0, 1), (17, 12_345), (2**40, 3)):
        out = np.empty(37, dtype=np.int64)
        window_starts(11, TRAIN_WINDOWS, first, count, out)
        twin = np.floor(uniform_twin(11, TRAIN_WINDOWS, first + np.arange(37, dtype=np.uint64))
                        * count).astype(np.int64)
        np.testing.assert_array_equal(out, twin)
        assert out.min() >= 0 and out.max() < count


def test_batch_is_a_pure_function_of_seed_and_step(char_dir):
    data = TextDataset(char_dir, block_size=33, seed=4)
    x, y = data.batch(7, 5)
    assert x.shape == y.shape == (5, 33) and x.dtype == y.dtype == np.int64
    again = TextDataset(char_dir, block_size=33, seed=4)
    for later in (again.batch(7, 5), data.batch(7, 5)):  # a fresh object (resume), or a repeat
        np.testing.assert_array_equal(later[0], x)
        np.testing.assert_array_equal(later[1], y)
    assert not np.array_equal(data.batch(8, 5)[0], x)
    assert not np.array_equal(TextDataset(char_dir, 33, seed=5).batch(7, 5)[0], x)


def test_batch_windows_are_the_text_shifted_by_one(char_dir):
    data = TextDataset(char_dir, block_size=16, seed=0)
    train = np.fromfile(char_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    x, y = data.batch(3, 9)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    starts = np.empty(9, dtype=np.int64)
    window_starts(0, TRAIN_WINDOWS, 3 * 9, len(train) - 16, starts)
    for row, start in enumerate(starts):
        np.testing.assert_array_equal(x[row], train[start:start + 16])
        np.testing.assert_array_equal(y[row], train[start + 1:start + 17])


def test_training_windows_reach_every_start(char_dir):
    data = TextDataset(char_dir, block_size=8, seed=0)
    n = data.train_tokens.shape[0]
    starts = np.empty(50 * n, dtype=np.int64)
    window_starts(0, TRAIN_WINDOWS, 0, n - 8, starts)
    counts = np.bincount(starts, minlength=n - 8)
    assert counts.shape[0] == n - 8 and counts.min() > 0  # the last start n - 9 included


@pytest.mark.parametrize("block_size, batch_size", [(1, 1), (7, 3), (64, 12), (1401, 2)])
def test_eval_windows_cover_the_split_exactly_once(char_dir, block_size, batch_size):
    data = TextDataset(char_dir, block_size=block_size)
    val = np.fromfile(char_dir / "val.bin", dtype=np.uint16).astype(np.int64)
    xs, ys = zip(*data.eval_batches(batch_size))
    assert all(x.shape[0] <= batch_size and x.shape[1] == block_size for x in xs)
    x, y = np.concatenate(xs).reshape(-1), np.concatenate(ys).reshape(-1)
    assert np.concatenate(xs).shape[0] == data.eval_windows
    targets = y[y != IGNORE_INDEX]
    np.testing.assert_array_equal(targets, val[1:])  # every target once, in order
    assert (y == IGNORE_INDEX).sum() < block_size and data.eval_tokens == len(val) - 1
    real = y != IGNORE_INDEX
    np.testing.assert_array_equal(x[real], val[:-1])  # each target's input is the token before


def test_fixed_windows_of_an_exact_multiple_need_no_padding():
    tokens = np.arange(13)
    (x, y), = fixed_windows(tokens, 4, 10)
    np.testing.assert_array_equal(x, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(y, np.arange(1, 13).reshape(3, 4))


def test_metrics_and_bits_per_byte(char_dir, tmp_path):
    data = TextDataset(char_dir, block_size=32)
    tokens = data.eval_tokens
    m = data.metrics(summed_loss=2.0 * tokens, tokens=tokens)
    assert m["loss"] == pytest.approx(2.0) and m["perplexity"] == pytest.approx(math.exp(2.0))
    assert data.eval_bytes == tokens  # the json package's source is ASCII: a byte per char
    assert m["bits_per_byte"] == pytest.approx(2.0 / math.log(2.0))

    (tmp_path / "u.txt").write_text("h\u00e9\u20ac" * 200, encoding="utf-8")  # 1 + 2 + 3 bytes
    prepare_text([tmp_path / "u.txt"], tmp_path / "u", "char", val_fraction=0.5)
    wide = TextDataset(tmp_path / "u", block_size=4)
    val = np.fromfile(tmp_path / "u" / "val.bin", dtype=np.uint16)
    assert wide.eval_bytes == len(wide.tokenizer.decode(val[1:]).encode("utf-8"))
    assert wide.metrics(3.0 * wide.eval_tokens, wide.eval_tokens)["bits_per_byte"] == \
        pytest.approx(3.0 * wide.eval_tokens / (math.log(2.0) * wide.eval_bytes))

    assert language_model_metrics(5.0, 2)["loss"] == 2.5
    assert "bits_per_byte" not in language_model_metrics(5.0, 2)
    assert language_model_metrics(1e6, 1)["perplexity"] == math.inf


def test_unigram_entropy(char_dir):
    assert unigram_entropy([5, 5]) == pytest.approx(math.log(2))
    assert unigram_entropy([3, 0, 0]) == 0.0
    data = TextDataset(char_dir, block_size=8)
    val = np.fromfile(char_dir / "val.bin", dtype=np.uint16)
    p = np.bincount(val) / len(val)
    p = p[p > 0]
    assert data.unigram_entropy("val") == pytest.approx(-(p * np.log(p)).sum())
    assert 2.0 < data.unigram_entropy("train") < math.log(data.vocab_size)
    with pytest.raises(ValueError, match="split must be"):
        data.unigram_entropy("test")


def test_ids_beyond_the_vocabulary_are_named(char_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("tokenizer.json", "meta.json", "val.bin"):
        (bad / name).write_bytes((char_dir / name).read_bytes())
    train = np.fromfile(char_dir / "train.bin", dtype=np.uint16)
    vocab_size = json.loads((char_dir / "meta.json").read_text())["vocab_size"]
    train[1234] = vocab_size
    train.tofile(bad / "train.bin")
    with pytest.raises(TextDataError, match=rf"train\.bin: token id {vocab_size} at token 1234 "
                                            rf"is not below vocab_size {vocab_size}"):
        TextDataset(bad, block_size=8)


def test_block_size_larger_than_the_validation_split(char_dir):
    val_tokens = json.loads((char_dir / "meta.json").read_text())["val_tokens"]
    with pytest.raises(TextDataError, match=rf"block_size {val_tokens} needs windows of "
                                            rf"{val_tokens + 1} tokens, but the val split has "
                                            rf"{val_tokens}"):
        TextDataset(char_dir, block_size=val_tokens)
    TextDataset(char_dir, block_size=val_tokens - 1)


def test_dtype_that_disagrees_with_meta(char_dir, tmp_path):
    with pytest.raises(TextDataError, match="hold uint16 ids .meta.json., not uint32"):
        TextDataset(char_dir, block_size=8, dtype=np.uint32)
    TextDataset(char_dir, block_size=8, dtype="uint16")
    widened = tmp_path / "widened"  # bins rewritten as uint32 while meta.json says uint16
    widened.mkdir()
    for name in ("tokenizer.json", "meta.json"):
        (widened / name).write_bytes((char_dir / name).read_bytes())
    for name in ("train.bin", "val.bin"):
        np.fromfile(char_dir / name, dtype=np.uint16).astype(np.uint32).tofile(widened / name)
    with pytest.raises(TextDataError, match="a different dtype or a changed file"):
        TextDataset(widened, block_size=8)


def test_a_directory_made_by_another_tokenizer(char_dir, tmp_path):
    with pytest.raises(TextDataError, match="made by another tokenizer than the run's"):
        TextDataset(char_dir, block_size=8, tokenizer=ByteTokenizer())
    with pytest.raises(TextDataError, match="another tokenizer"):
        TextDataset(char_dir, block_size=8, tokenizer=CharTokenizer(list("abc")))
    data = TextDataset(char_dir, block_size=8)
    TextDataset(char_dir, block_size=8, tokenizer=data.tokenizer)


def test_directory_without_meta_json(tmp_path):
    np.zeros(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(TextDataError, match="no meta.json; make the directory with npcpu "
                                            "prepare-text"):
        TextDataset(tmp_path, block_size=8)


def test_argument_checks(char_dir):
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        TextDataset(char_dir, block_size=0)
    data = TextDataset(char_dir, block_size=8)
    with pytest.raises(ValueError, match="step must be >= 0"):
        data.batch(-1, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(data.eval_batches(0))


def test_a_bigram_model_through_the_evaluation_is_well_below_the_unigram_entropy(char_dir):
    """The evaluation path end to end with the simplest model that uses context: bigram counts
    of train.bin (add-0.1 smoothing), scored on every validation target."""
    data = TextDataset(char_dir, block_size=64)
    train = np.asarray(data.train_tokens, dtype=np.int64)
    counts = np.zeros((data.vocab_size, data.vocab_size))
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    log_p = np.log((counts + 0.1) / (counts + 0.1).sum(axis=1, keepdims=True))
    summed, tokens = 0.0, 0
    for x, y in data.eval_batches(16):
        scored = y != IGNORE_INDEX
        summed -= log_p[x[scored], y[scored]].sum()
        tokens += int(scored.sum())
    assert tokens == data.eval_tokens
    metrics = data.metrics(summed, tokens)
    assert type(metrics["loss"]) is float
    assert metrics["loss"] < data.unigram_entropy("val") - 0.5
    assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / math.log(2.0))


def test_bins_nanogpt_wrote_are_adopted_where_they_are(tmp_path):
    """nanoGPT's shakespeare_char prepare, restated (vocabulary sorted(set(data)), uint16 ids,
    90/10 split, tofile), then adopt_bins with the char tokenizer of the same text."""
    data = open(SOURCE, encoding="utf-8").read()
    stoi = {c: i for i, c in enumerate(sorted(set(data)))}
    ids = np.array([stoi[c] for c in data], dtype=np.uint16)
    n = len(data)
    ids[:int(n * 0.9)].tofile(tmp_path / "train.bin")
    ids[int(n * 0.9):].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.pkl").write_bytes(b"not read")

    meta = adopt_bins(tmp_path, CharTokenizer.from_texts([data]))
    assert (meta["vocab_size"], meta["dtype"], meta["train_tokens"]) == (len(stoi), "uint16",
                                                                         int(n * 0.9))
    dataset = TextDataset(tmp_path, block_size=16)
    x, y = dataset.batch(0, 2)
    assert dataset.tokenizer.decode(x[0]) in data
    with pytest.raises(TextDataError, match="meta.json: exists already"):
        adopt_bins(tmp_path, CharTokenizer.from_texts([data]))


def test_adopting_with_too_small_a_vocabulary_is_refused_and_writes_nothing(tmp_path):
    np.array([0, 1, 2, 3, 9], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([0, 1], dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(TextDataError, match=r"train\.bin: token id 9 at token 4 is not below "
                                            r"vocab_size 4"):
        adopt_bins(tmp_path, CharTokenizer(list("abcd")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]
    (tmp_path / "val.bin").write_bytes(b"\x00\x00\x01")
    with pytest.raises(TextDataError, match="3 bytes is not a whole number of uint16 ids"):
        adopt_bins(tmp_path, CharTokenizer(list("abcdefghij")))


def test_micro_batches_are_the_rows_of_one_large_batch(char_dir):
    data = TextDataset(char_dir, block_size=10, seed=3)
    large_x, large_y = data.batch(5, 4 * 3)
    for i in range(3):
        x, y = data.batch(5 * 3 + i, 4)
        np.testing.assert_array_equal(x, large_x[4 * i:4 * i + 4])
        np.testing.assert_array_equal(y, large_y[4 * i:4 * i + 4])


def test_a_meta_json_dtype_that_cannot_hold_the_vocabulary(char_dir, tmp_path):
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        (tmp_path / name).write_bytes((char_dir / name).read_bytes())
    meta = json.loads((char_dir / "meta.json").read_text())
    for dtype in ("int8", "float32"):
        (tmp_path / "meta.json").write_text(json.dumps(dict(meta, dtype=dtype)))
        with pytest.raises(TextDataError, match=f"dtype '{dtype}' cannot hold vocab_size"):
            TextDataset(tmp_path, block_size=8)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), block_size=st.integers(1, 40), batch_size=st.integers(1, 9))
def test_fixed_windows_predict_every_token_once_for_any_sizes(n, block_size, batch_size):
    tokens = np.arange(n) % 7 + 10 * (np.arange(n) // 7)  # distinct enough to see order
    xs, ys = zip(*fixed_windows(tokens, block_size, batch_size))
    assert all(x.shape == y.shape and x.shape[1] == block_size and 1 <= x.shape[0] <= batch_size
               for x, y in zip(xs, ys))
    x, y = np.concatenate(xs).reshape(-1), np.concatenate(ys).reshape(-1)
    scored = y != IGNORE_INDEX
    np.testing.assert_array_equal(y[scored], tokens[1:])
    np.testing.assert_array_equal(x[scored], tokens[:-1])
    assert scored[:n - 1].all() and not scored[n - 1:].any()  # padding only at the very end
    assert len(x) == -(-(n - 1) // block_size) * block_size
