"""prepare-text: text files -> DIR/train.bin, DIR/val.bin, DIR/tokenizer.json, DIR/meta.json.

The bins are nanoGPT's format: the token ids of the whole text, one after another, as raw
little-endian uint16 (uint32 when the vocabulary has more than 65,536 ids), no header. The split
is nanoGPT's: the first int(n * (1 - val_fraction)) of the n tokens train, the rest validate, so
the validation text is the end of the input (of the last file, when several are given: files are
tokenized one by one and their ids concatenated in the order given).

nanoGPT's shakespeare_char: its vocabulary is the sorted distinct characters of input.txt and its
split is the same, so `npcpu prepare-text input.txt --tokenizer char --out DIR` writes bins
byte-identical to the ones nanoGPT's prepare.py writes. Its meta.pkl, a pickle, is not read; to
use bins nanoGPT already wrote where they are, npcpu.text.adopt_bins adds meta.json and
tokenizer.json beside them.

Inputs larger than memory stream through in chunks of `chunk_bytes`, in two passes: the first
checks every file (not empty, no NUL byte, valid UTF-8) and builds the tokenizer (the char
vocabulary, or BPE training fed chunk by chunk); the second encodes and writes. Char and byte ids
do not depend on where text is cut; for BPE a chunk ends only at a line break between two
non-space characters, where byte-level BPE's pre-tokenizer splits anyway, so the bins equal those
of encoding each whole file at once (a file with no such line break is held whole in memory). A
given tokenizer.json is cut the same way: exact for byte-level BPE (GPT-2's included), assumed
for others.

Everything is written in a temporary directory beside DIR and moved into DIR at the end, meta.json
last: an error leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from npcpu.checks import check_int, check_real
from npcpu.text.tokenizers import (TOKENIZER_KINDS, BPETokenizer, ByteTokenizer, CharTokenizer,
                                   load_tokenizer)

DEFAULT_CHUNK_BYTES = 1 << 20
PROGRESS_MIN_BYTES = 1 << 25  # a progress bar only when the inputs take more than a moment
META_FORMAT = "npcpu-text-bins"
OUTPUT_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


class TextDataError(ValueError):
    """Input or output of prepare-text or TextDataset that cannot be used (names the file)."""


def bin_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (nanoGPT's format), uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _line_cut(text: str) -> int:
    """Length of the longest prefix of `text` ending with a line break between two non-space
    characters (0 when there is none): a place byte-level BPE's pre-tokenizer splits anyway."""
    end = len(text) - 1
    while True:
        i = text.rfind("\n", 1, end)
        if i < 0:
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        end = i


def read_chunks(path, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, cut_anywhere: bool = True,
                progress=None):
    """Yield the text of the file at `path` in pieces of about `chunk_bytes` bytes.

    Raises TextDataError naming the file for an empty file, a NUL byte (a binary file) or bytes
    that are not UTF-8, with the byte offset. With cut_anywhere=False a piece ends only where
    `_line_cut` allows (the rest is carried into the next piece). `progress`, if given, is a tqdm
    bar advanced by the bytes read.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        raise TextDataError(f"{path}: the file is empty")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    carry = ""
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            final = not raw
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise TextDataError(f"{path}: a NUL byte at byte offset {offset + nul}: a binary "
                                    f"file, not text")
            pending = len(decoder.getstate()[0])
            try:
                text = carry + decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise TextDataError(f"{path}: not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                                    f"byte offset {offset - pending + e.start} "
                                    f"({e.reason})") from None
            offset += len(raw)
            if progress is not None:
                progress.update(len(raw))
            if final:
                if text:
                    yield text
                return
            cut = len(text) if cut_anywhere else _line_cut(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]


def _progress_bar(total_bytes: int, description: str, show: bool | None):
    if show is None:
        show = total_bytes >= PROGRESS_MIN_BYTES
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=description)


def _check_out_dir(out_dir: Path, kind: str) -> None:
    """Refuse an output directory holding another tokenizer's bins, or bins of unknown origin."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise TextDataError(f"{out_dir}: exists and is not a directory")
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        try:
            made_by = json.loads(meta_path.read_text(encoding="utf-8"))["tokenizer"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise TextDataError(f"{meta_path}: not a prepare-text meta.json; choose another "
                                f"--out") from None
        if made_by != kind:
            raise TextDataError(f"{out_dir}: holds data made by the {made_by!r} tokenizer, not "
                                f"{kind!r}; choose another --out or delete that directory")
    elif any((out_dir / name).exists() for name in ("train.bin", "val.bin")):
        raise TextDataError(f"{out_dir}: holds train.bin/val.bin without a meta.json (not "
                            f"written by prepare-text); choose another --out")


def _build_tokenizer(tokenizer, vocab_size, files, chunk_bytes, show_progress, total_bytes):
    """The tokenizer, trained on the files when its kind needs training; checks every file."""
    context_free = tokenizer in ("char", "byte") or getattr(tokenizer, "context_free", False)
    bar = _progress_bar(total_bytes, "read", show_progress)

    def chunks():
        for path in files:
            yield from read_chunks(path, chunk_bytes, cut_anywhere=context_free, progress=bar)

    try:
        if tokenizer == "char":
            return CharTokenizer.from_texts(chunks())
        if tokenizer == "bpe":
            return BPETokenizer.train(chunks(), vocab_size)
        for _ in chunks():
            pass
        return ByteTokenizer() if tokenizer == "byte" else tokenizer
    finally:
        if bar is not None:
            bar.close()


def _encode_files(tokenizer, files, tokens_path, dtype, chunk_bytes, show_progress, total_bytes):
    """Write the ids of all files to tokens_path; return their count and the (V,) id histogram."""
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    bar = _progress_bar(total_bytes, "encode", show_progress)
    try:
        with open(tokens_path, "wb") as out:
            for path in files:
                for text in read_chunks(path, chunk_bytes, cut_anywhere=tokenizer.context_free,
                                        progress=bar):
                    ids = tokenizer.encode(text)
                    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                        raise TextDataError(f"{path}: the tokenizer gave an id outside "
                                            f"[0, {tokenizer.vocab_size})")
                    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
                    out.write(ids.astype(dtype).tobytes())
    finally:
        if bar is not None:
            bar.close()
    return int(counts.sum()), counts


def _split(tokens_path: Path, train_path: Path, val_path: Path, n_train: int, dtype) -> None:
    """train = the first n_train ids, val = the rest: the tail is copied out, the file truncated."""
    with open(tokens_path, "rb") as src, open(val_path, "wb") as dst:
        src.seek(n_train * dtype.itemsize)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.truncate(tokens_path, n_train * dtype.itemsize)
    os.replace(tokens_path, train_path)


def prepare_text(files, out_dir, tokenizer="char", vocab_size: int | None = None,
                 val_fraction: float = 0.1, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 progress: bool | None = None) -> dict:
    """Tokenize `files` into out_dir (see the module docstring); return the metadata written.

    Parameters
    ----------
    files : path or sequence of paths
        UTF-8 text files, tokenized in order.
    out_dir : path
        Created if missing; may already hold an earlier prepare-text output of the same tokenizer
        kind (its four files are replaced).
    tokenizer : "char", "byte", "bpe", a tokenizer object, or the path of a tokenizer.json
        How text becomes ids. "char" takes its vocabulary from the files, "bpe" trains a
        byte-level BPE of `vocab_size` ids on them; a given tokenizer is used as it is.
    vocab_size : int
        Only for "bpe" (>= 256).
    val_fraction : float in (0, 1)
        The last fraction of the tokens that validate.
    chunk_bytes : int
        Bytes read at a time.
    progress : bool or None
        Show tqdm bars; None: only for inputs of at least PROGRESS_MIN_BYTES.
    """
    files = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    if not files:
        raise TextDataError("prepare-text: no input files")
    val_fraction = check_real("prepare-text", "val_fraction", val_fraction, low=0.0, high=1.0,
                              low_open=True, high_open=True)
    chunk_bytes = check_int("prepare-text", "chunk_bytes", chunk_bytes, 1)
    if isinstance(tokenizer, (str, os.PathLike)) and str(tokenizer) not in TOKENIZER_KINDS:
        if not os.path.isfile(tokenizer):
            raise TextDataError(f"prepare-text: tokenizer must be one of {TOKENIZER_KINDS} or a "
                                f"tokenizer.json file, got {str(tokenizer)!r}")
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer == "bpe" and vocab_size is None:
        raise TextDataError("prepare-text: the bpe tokenizer needs --vocab-size")
    if vocab_size is not None and tokenizer != "bpe":
        raise TextDataError(f"prepare-text: --vocab-size applies to the bpe tokenizer only, not "
                            f"{getattr(tokenizer, 'kind', tokenizer)!r}")
    for path in files:
        if not path.is_file():
            raise TextDataError(f"{path}: no such file")
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.kind
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, kind)
    sizes = [path.stat().st_size for path in files]
    total_bytes = sum(sizes)

    tokenizer = _build_tokenizer(tokenizer, vocab_size, files, chunk_bytes, progress, total_bytes)
    dtype = bin_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        n, counts = _encode_files(tokenizer, files, work / "tokens.bin", dtype, chunk_bytes,
                                  progress, total_bytes)
        n_train = int(n * (1.0 - val_fraction))
        if n_train < 2 or n - n_train < 2:
            raise TextDataError(f"prepare-text: {n} tokens are too few to split with "
                                f"val_fraction={val_fraction} (each split needs 2 or more)")
        _split(work / "tokens.bin", work / "train.bin", work / "val.bin", n_train, dtype)
        tokenizer.save(work / "tokenizer.json")
        meta = {
            "format": META_FORMAT, "version": 1,
            "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name, "train_tokens": n_train, "val_tokens": n - n_train,
            "val_fraction": val_fraction, "distinct_tokens": int(np.count_nonzero(counts)),
            "sources": [{"path": str(path.resolve()), "bytes": size}
                        for path, size in zip(files, sizes)],
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _move_into(work: Path, out_dir: Path) -> None:
    """Put the finished files in out_dir: a rename of the whole directory when out_dir is new;
    otherwise file by file, the old meta.json removed first and the new one moved last, so a
    directory caught half-way has no meta.json and is refused rather than misread."""
    if not out_dir.exists():
        os.rename(work, out_dir)
        return
    (out_dir / "meta.json").unlink(missing_ok=True)
    for name in OUTPUT_FILES:
        os.replace(work / name, out_dir / name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `npcpu prepare-text`."""
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output directory (train.bin, val.bin, tokenizer.json, meta.json)")
    parser.add_argument("--tokenizer", default="char", metavar="{char,byte,bpe,FILE.json}",
                        help="char (vocabulary from the data), byte (256 ids), bpe (trained "
                             "here, needs --vocab-size), or an existing tokenizer.json "
                             "(default char)")
    parser.add_argument("--vocab-size", type=int, metavar="N", help="BPE vocabulary size")
    parser.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                        help="last fraction of the tokens kept for validation (default 0.1)")


def run(args) -> int:
    """Run prepare-text from parsed arguments; print a one-line summary."""
    meta = prepare_text(args.files, args.out, args.tokenizer, args.vocab_size,
                        args.val_fraction)
    print(f"{args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"{meta['tokenizer']} tokenizer, vocab_size {meta['vocab_size']}, {meta['dtype']}")
    return 0
