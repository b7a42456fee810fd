"""MNIST from its IDX files, and a reader and writer for the IDX format itself.

IDX (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian header, then the array in C
order, big-endian:

    bytes 0-1   zero
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
                0x0E float64
    byte  3     number of dimensions, ndim
    then        ndim uint32 sizes, then prod(sizes) elements

MNIST's images have magic number 0x00000803 (uint8, 3 dimensions: count, rows, cols) and its labels
0x00000801 (uint8, 1 dimension: count). Files may be gzipped (name ending in .gz).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from npcpu.data.arrays import ArrayDataset

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {(dtype.kind, dtype.itemsize): code for code, dtype in _IDX_DTYPES.items()}
MNIST_IMAGES_MAGIC = 0x00000803
MNIST_LABELS_MAGIC = 0x00000801


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz (a corrupt archive is a ValueError)."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a valid gzip file ({error})") from error


def read_idx(path, *, magic: int | None = None) -> np.ndarray:
    """The array stored in the IDX file `path` (gzipped if its name ends in .gz), native byte order.

    With `magic`, the file's 4-byte magic number must equal it (e.g. 0x00000803 for MNIST images).
    Every inconsistency (magic number, element type, a header or body whose length disagrees with
    the sizes in the header) is a ValueError that names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for the 4-byte IDX magic number")
    found = int.from_bytes(raw[:4], "big")
    if magic is not None and found != magic:
        raise ValueError(f"{path}: magic number 0x{found:08X}, expected 0x{magic:08X}")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: magic number 0x{found:08X} is not IDX "
                         "(its first two bytes must be 0)")
    if raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02X} "
                         f"(known: {', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: header of {ndim} dimensions needs {header_bytes} bytes, "
                         f"the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    expected = header_bytes + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} of {dtype.name}, i.e. {expected} "
                         f"bytes, but the file has {len(raw)} bytes")
    data = np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path, array) -> None:
    """Write `array` (uint8, int8, int16, int32, float32 or float64) as an IDX file; gzip if the
    name ends in .gz. `read_idx(path)` returns an equal array."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(f"write_idx: IDX has no element type for dtype {array.dtype} "
                        "(use uint8, int8, int16, int32, float32 or float64)")
    if array.ndim > 255 or any(n >= 2**32 for n in array.shape):
        raise ValueError(f"write_idx: IDX holds at most 255 dimensions of size < 2**32, "
                         f"got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    data = header + body
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def _find(directory: Path, name: str) -> Path:
    """directory/name, or directory/name.gz when only that exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"load_mnist: neither {name} nor {name}.gz is in {directory}")


def load_mnist(directory, *, train: bool = True) -> ArrayDataset:
    """The MNIST training (60,000) or test (10,000) set from the standard IDX files in `directory`.

    Reads train-images-idx3-ubyte and train-labels-idx1-ubyte (t10k-... when train=False), plain or
    gzipped (.gz), whichever exists. Images become rows of rows*cols = 784 uint8 pixels, kept as
    they are in the file with the data set's scale 1 / 255 (ArrayDataset's `scale`: its batches are
    float32 in [0, 1], and the compiled training step reads a quarter of float32's bytes); labels
    int64 in 0..9.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        A file is not what it claims (magic number, sizes, length), image and label counts differ,
        or a label is outside 0..9; the message names the file.
    """
    directory = Path(directory)
    prefix = "train" if train else "t10k"
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, magic=MNIST_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=MNIST_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"load_mnist: {images_path} has {len(images)} images but {labels_path} "
                         f"has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        row = int(np.argmax(labels > 9))
        raise ValueError(f"{labels_path}: label {row} is {labels[row]}, expected 0..9")
    count, rows, cols = images.shape
    return ArrayDataset(images.reshape(count, rows * cols), labels.astype(np.int64), num_classes=10,
                        scale=1 / 255)
