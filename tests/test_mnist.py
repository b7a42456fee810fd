import gzip

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npcpu.data.mnist import load_mnist, read_idx, write_idx

COUNT, ROWS, COLS = 7, 28, 28
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
fuzz = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mnist_arrays(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (COUNT, ROWS, COLS), dtype=np.uint8)
    images[0, 0, 0], images[1, 0, 0] = 0, 255
    return images, rng.integers(0, 10, COUNT, dtype=np.uint8)


def _write_mnist(directory, *, gz=False, prefix="train"):
    """Valid MNIST-format files (and nothing else) in `directory`."""
    for f in directory.iterdir():
        f.unlink()
    images, labels = _mnist_arrays()
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    array = (np.random.default_rng(0).standard_normal((3, 5, 2)) * 100).astype(dtype)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == (3, 5, 2)
    np.testing.assert_array_equal(back, array)


def test_write_idx_big_endian_layout(tmp_path):
    write_idx(tmp_path / "a", np.array([1, 258], dtype=np.int32))
    assert (tmp_path / "a").read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 2,
                                                  0, 0, 0, 1, 0, 0, 1, 2])


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_load_mnist(tmp_path, gz, train):
    images, labels = _write_mnist(tmp_path, gz=gz, prefix="train" if train else "t10k")
    ds = load_mnist(tmp_path, train=train)
    assert len(ds) == COUNT and ds.num_classes == 10 and ds.input_dim == 784
    x, y = ds.batch(np.arange(COUNT))
    assert x.dtype == np.float32 and x.shape == (COUNT, 784) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x, images.reshape(COUNT, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_wrong_magic_is_named(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / LABELS, np.zeros((COUNT, 1), dtype=np.uint8))  # magic 0x00000802
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte: magic number 0x00000802, "
                                         r"expected 0x00000801"):
        load_mnist(tmp_path)


def test_mismatched_counts(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / LABELS, np.zeros(COUNT - 1, dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{COUNT} images but .* {COUNT - 1} labels"):
        load_mnist(tmp_path)


def test_label_out_of_range(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / LABELS, np.array([0, 1, 2, 10, 4, 5, 6], dtype=np.uint8))
    with pytest.raises(ValueError, match="label 3 is 10, expected 0..9"):
        load_mnist(tmp_path)


def test_extra_bytes(tmp_path):
    _write_mnist(tmp_path)
    with open(tmp_path / IMAGES, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"images-idx3-ubyte: header says shape \(7, 28, 28\)"):
        load_mnist(tmp_path)


def _expect_clear_value_error(directory, corrupted_name):
    with pytest.raises(ValueError) as info:
        load_mnist(directory)
    assert corrupted_name in str(info.value)


@fuzz
@given(which=st.sampled_from([IMAGES, LABELS]), data=st.data())
def test_fuzz_truncation(tmp_path, which, data):
    for gz in (False, True):
        _write_mnist(tmp_path, gz=gz)
        path = tmp_path / (which + (".gz" if gz else ""))
        raw = path.read_bytes()
        path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")])
        _expect_clear_value_error(tmp_path, which)


@fuzz
@given(which=st.sampled_from([IMAGES, LABELS]), gz=st.booleans(), data=st.data())
def test_fuzz_header_byte_flip(tmp_path, which, gz, data):
    """Every byte of the header matters: flipping any bits of one makes the file invalid."""
    _write_mnist(tmp_path)
    path = tmp_path / which
    raw = bytearray(path.read_bytes())
    header_bytes = 16 if which == IMAGES else 8
    position = data.draw(st.integers(0, header_bytes - 1), label="position")
    raw[position] ^= data.draw(st.integers(1, 255), label="mask")
    if gz:
        path.unlink()
        path = path.with_name(which + ".gz")
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    _expect_clear_value_error(tmp_path, which)


@fuzz
@given(extra=st.binary(min_size=1, max_size=64), which=st.sampled_from([IMAGES, LABELS]))
def test_fuzz_extra_bytes(tmp_path, extra, which):
    _write_mnist(tmp_path)
    with open(tmp_path / which, "ab") as f:
        f.write(extra)
    _expect_clear_value_error(tmp_path, which)


def test_corrupt_gzip_body(tmp_path):
    _write_mnist(tmp_path, gz=True)
    path = tmp_path / (IMAGES + ".gz")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not a valid gzip file"):
        load_mnist(tmp_path)
