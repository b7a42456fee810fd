"""The safetensors file of a checkpoint: which arrays it can hold, and reading it back.

npcpu writes the file itself too (`durable.write_safetensors` says why); tests/test_checkpoint.py
checks that the library's reader reads what npcpu writes, and agrees with npcpu's parser, on
every dtype. Why npcpu parses the file itself instead of calling the safetensors library's loader:

- The SHA-256 recorded in state.json must cover the very bytes that are loaded, so the file is
  read once into one buffer, hashed, and parsed from that buffer. `safetensors.numpy.load(bytes)`
  would parse a buffer, but it has no bfloat16 (a KeyError on "BF16"; npcpu stores bf16
  parameters and optimizer states); `load_file` / `safe_open` read the file again from disk.
- A damaged file must give an error naming the tensor and what is wrong with it; the library's
  deserializer reports "invalid shape, data type, or offset for tensor" without the name.
- The arrays come back as writable views into the one buffer, not as a second copy per tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from npcpu.checks import parse_json
from npcpu.checkpoint.codec import CheckpointError, short
from npcpu.precision import bfloat16

# safetensors dtype codes and the NumPy dtypes they hold (bfloat16 through ml_dtypes).
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": bfloat16,
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
SUPPORTED_DTYPES = set(SAFETENSORS_DTYPES.values())
FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), bfloat16)


def safetensors_code(name: str, dtype: np.dtype) -> str:
    """The safetensors dtype code ("F32", "BF16", ...) of a storable dtype."""
    for code, candidate in SAFETENSORS_DTYPES.items():
        if dtype == candidate:
            return code
    raise TypeError(f"checkpoint tensor {name!r} has dtype {dtype}, which safetensors cannot hold")


def storable(name: str, array: np.ndarray) -> np.ndarray:
    """`array` as a C-contiguous array of a dtype safetensors holds (TypeError otherwise)."""
    dtype = array.dtype.newbyteorder("=")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"checkpoint tensor {name!r} has dtype {array.dtype}; supported: "
                        f"{sorted(d.name for d in SUPPORTED_DTYPES)}")
    if name == "__metadata__":
        raise ValueError("checkpoint tensor name '__metadata__' is reserved by safetensors")
    return array.astype(dtype, order="C", copy=False)  # (np.ascontiguousarray makes 0-d 1-d)


def parse_safetensors(buffer: bytearray, where: Path) -> dict[str, np.ndarray]:
    """The arrays in a safetensors file's bytes, as writable views into `buffer`.

    Layout: 8-byte little-endian header length N, N bytes of JSON header
    ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}``, then the data;
    offsets count from the end of the header.
    """
    if len(buffer) < 8:
        raise CheckpointError(f"{where}: {len(buffer)} bytes, too short for a safetensors file")
    header_len = int.from_bytes(buffer[:8], "little")
    data_start = 8 + header_len
    if data_start > len(buffer):
        raise CheckpointError(f"{where}: header claims {header_len} bytes but the file has "
                              f"{len(buffer)} (truncated?)")
    header = parse_json(bytes(buffer[8:data_start]), f"{where}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    data_len = len(buffer) - data_start
    arrays, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"{where}: bad header entry for {name!r}: "
                                  f"{short(entry)}") from err
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len \
                or end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{where}: tensor {name!r} with shape {shape} and dtype "
                                  f"{dtype.name} does not fit data_offsets [{begin}, {end}] in "
                                  f"{data_len} data bytes")
        arrays[name] = (np.frombuffer(buffer, dtype, count, data_start + begin).reshape(shape)
                        if count else np.empty(shape, dtype))
        if begin < end:
            spans.append((begin, end, name))
    # tensors sharing bytes would be one array under two names: a change to one changes both
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{where}: tensors {first!r} and {second!r} overlap in the "
                                  "data (their data_offsets share bytes)")
    return arrays

