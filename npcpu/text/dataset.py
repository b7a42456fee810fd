"""TextDataset: training windows and evaluation windows over prepare-text's memory-mapped bins.

Shapes: B sequences per batch, T = block_size positions per sequence.

    dataset.batch(step, B)       (x, y), each (B, T) int64, y[:, t] = x[:, t + 1] of the text:
                                 B windows of T + 1 tokens at random places in train.bin, a pure
                                 function of (seed, step, B) (counter-based; resuming at step s
                                 needs no replay)
    dataset.eval_batches(B)      the validation split cut into consecutive windows of T targets,
                                 each predicted token exactly once; the last window is padded
                                 with IGNORE_INDEX targets (and id 0 inputs after the text)
    dataset.metrics(sum, n)      loss, perplexity, bits per byte from summed token losses

x and y are int64: NumPy's index type, which an embedding lookup and the loss's gather of target
logits take without a conversion, and signed, for IGNORE_INDEX. A batch is B * T * 8 bytes.

Training windows are drawn independently (with replacement) among the n - T start positions of a
split of n tokens, as nanoGPT draws them. Window j of step s is counter s * B + j of the stream,
so k micro-batches batch(s * k + i, B), i < k, are exactly the rows of batch(s, k * B): gradient
accumulation sees the same windows as one large batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from npcpu.checks import check_int, parse_json
from npcpu.text.prepare import META_FORMAT, TextDataError, bin_dtype
from npcpu.text.sampling import TRAIN_WINDOWS, window_starts
from npcpu.text.tokenizers import load_tokenizer, same_tokenizer

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index, as in torch
_HISTOGRAM_CHUNK = 1 << 24


def unigram_entropy(counts) -> float:
    """Entropy in nats of the distribution counts / counts.sum(): H = -sum p log p.

    The loss of the best model that ignores context: a language model should end well below it.
    """
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def language_model_metrics(summed_loss: float, tokens: int,
                           bytes_per_token: float | None = None) -> dict:
    """{"loss", "perplexity"[, "bits_per_byte"]} from the sum of per-token losses (nats).

    loss = summed_loss / tokens; perplexity = exp(loss); bits per byte = summed_loss /
    (ln 2 * tokens * bytes_per_token), the tokenizer-independent measure (char and byte
    tokenizers, where each token is a known number of bytes of the text).
    """
    tokens = int(tokens)
    if tokens <= 0:
        raise ValueError(f"language_model_metrics: tokens must be positive, got {tokens}")
    loss = float(summed_loss) / tokens
    metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700.0 else math.inf}
    if bytes_per_token is not None:
        metrics["bits_per_byte"] = float(summed_loss) / (math.log(2.0) * tokens * bytes_per_token)
    return metrics


def _histogram(tokens: np.ndarray, vocab_size: int, path: Path) -> np.ndarray:
    """(V,) counts of each id in `tokens`, read in chunks; TextDataError at the first id >= V."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, tokens.shape[0], _HISTOGRAM_CHUNK):
        chunk = tokens[start:start + _HISTOGRAM_CHUNK]
        chunk_counts = np.bincount(chunk)
        if chunk_counts.shape[0] > vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise TextDataError(f"{path}: token id {int(tokens[where])} at token {where} is not "
                                f"below vocab_size {vocab_size}")
        counts[:chunk_counts.shape[0]] += chunk_counts
    return counts


def read_meta(data_dir) -> dict:
    """meta.json of a prepare-text directory, checked for the keys TextDataset reads."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise TextDataError(f"{data_dir}: no meta.json; make the directory with npcpu "
                            f"prepare-text, or describe bins made elsewhere (nanoGPT's) with "
                            f"npcpu.text.adopt_bins")
    meta = parse_json(path.read_bytes(), str(path), TextDataError)
    if not isinstance(meta, dict):
        raise TextDataError(f"{path}: not a prepare-text meta.json (a JSON {type(meta).__name__}, "
                            "not an object)")
    missing = [k for k in ("format", "tokenizer", "vocab_size", "dtype", "train_tokens",
                           "val_tokens") if k not in meta]
    if missing or meta["format"] != META_FORMAT:
        raise TextDataError(f"{path}: not a prepare-text meta.json (missing {missing} or format "
                            f"{meta.get('format')!r} != {META_FORMAT!r})")
    for key, low in (("vocab_size", 1), ("train_tokens", 0), ("val_tokens", 0)):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TextDataError(f"{path}: {key} must be an integer >= {low}, got {value!r}")
    for key in ("tokenizer", "dtype"):
        if not isinstance(meta[key], str):
            raise TextDataError(f"{path}: {key} must be a string, got {meta[key]!r}")
    return meta


def adopt_bins(data_dir, tokenizer) -> dict:
    """Write meta.json and tokenizer.json beside train.bin and val.bin made by another program
    (nanoGPT's prepare.py: uint16 ids, no header) so that TextDataset reads them unchanged.

    For nanoGPT's shakespeare_char the tokenizer is CharTokenizer.from_texts([text of its
    input.txt]): its meta.pkl holds the same vocabulary (sorted distinct characters), but is a
    pickle, which npcpu does not read. Every id is checked against the tokenizer's vocab_size;
    an error leaves the directory as it was.
    """
    data_dir = Path(data_dir)
    for name in ("meta.json", "tokenizer.json"):
        if (data_dir / name).exists():
            raise TextDataError(f"{data_dir / name}: exists already; adopt_bins describes bins "
                                f"that have no meta.json or tokenizer.json")
    dtype = bin_dtype(tokenizer.vocab_size)
    tokens = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise TextDataError(f"{path}: missing")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise TextDataError(f"{path}: {size} bytes is not a whole number of {dtype} ids")
        ids = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        counts = _histogram(ids, tokenizer.vocab_size, path)
        tokens[split] = int(counts.sum())
    meta = {"format": META_FORMAT, "version": 1, "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
            "val_fraction": tokens["val"] / max(tokens["train"] + tokens["val"], 1),
            "sources": []}
    tokenizer.save(data_dir / "tokenizer.json")
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


class TextDataset:
    """Language-model windows over DIR/train.bin and DIR/val.bin made by prepare-text.

    Parameters
    ----------
    data_dir : path
        A prepare-text output directory.
    block_size : int
        T, the positions of a window (its inputs; a window reads T + 1 tokens).
    seed : int
        Chooses the training windows.
    dtype : str or numpy dtype, optional
        The id type the caller expects in the bins; an error when meta.json says otherwise.
    tokenizer : tokenizer, optional
        The run's tokenizer; an error when the directory was made by another one.

    Every id of both bins is checked against vocab_size once, here (one pass over each file;
    the counts it gives serve unigram_entropy and bits per byte).
    """

    def __init__(self, data_dir, block_size: int, *, seed: int = 0, dtype=None, tokenizer=None):
        self.data_dir = Path(data_dir)
        self.block_size = check_int("TextDataset", "block_size", block_size, 1)
        self.seed = check_int("TextDataset", "seed", seed, 0, 2**63)
        self.meta = read_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        self.vocab_size = int(self.meta["vocab_size"])
        if self.tokenizer.vocab_size != self.vocab_size:
            raise TextDataError(f"{self.data_dir}: tokenizer.json has {self.tokenizer.vocab_size}"
                                f" ids but meta.json says vocab_size {self.vocab_size}")
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        if self.meta["dtype"] not in ("uint16", "uint32") or \
                bin_dtype(self.vocab_size).itemsize > np.dtype(self.meta["dtype"]).itemsize:
            raise TextDataError(f"{self.data_dir / 'meta.json'}: dtype {self.meta['dtype']!r} "
                                f"cannot hold vocab_size {self.vocab_size} (uint16 or uint32)")
        self.dtype = np.dtype(self.meta["dtype"])
        if dtype is not None and np.dtype(dtype) != self.dtype:
            raise TextDataError(f"{self.data_dir}: the bins hold {self.dtype} ids (meta.json), "
                                f"not {np.dtype(dtype)}")
        self.train_tokens = self._open("train")
        self.val_tokens = self._open("val")
        self.train_counts = _histogram(self.train_tokens, self.vocab_size,
                                       self.data_dir / "train.bin")
        self.val_counts = _histogram(self.val_tokens, self.vocab_size, self.data_dir / "val.bin")
        lengths = self.tokenizer.token_byte_lengths()
        self.eval_tokens = self.val_tokens.shape[0] - 1
        self.eval_bytes = (None if lengths is None else
                           int(self.val_counts @ lengths - lengths[self.val_tokens[0]]))

    def _open(self, split: str) -> np.ndarray:
        """The memory-mapped ids of split.bin; its length must be meta.json's and exceed T."""
        path = self.data_dir / f"{split}.bin"
        if not path.is_file():
            raise TextDataError(f"{path}: missing")
        size = path.stat().st_size
        expected = int(self.meta[f"{split}_tokens"])
        if size != expected * self.dtype.itemsize:
            raise TextDataError(f"{path}: {size} bytes, but meta.json says {expected} tokens of "
                                f"{self.dtype} ({expected * self.dtype.itemsize} bytes): a "
                                f"different dtype or a changed file")
        if expected < self.block_size + 1:
            raise TextDataError(f"{path}: block_size {self.block_size} needs windows of "
                                f"{self.block_size + 1} tokens, but the {split} split has "
                                f"{expected}")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(expected,))

    def check_tokenizer(self, tokenizer) -> None:
        """TextDataError unless `tokenizer` maps text to the same ids as the directory's."""
        if not same_tokenizer(tokenizer, self.tokenizer):
            raise TextDataError(f"{self.data_dir}: made by another tokenizer than the run's "
                                f"(directory: {self.tokenizer.kind}, vocab_size "
                                f"{self.tokenizer.vocab_size}; run: {tokenizer.kind}, vocab_size "
                                f"{tokenizer.vocab_size})")

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) (B, T) int64: B training windows, a pure function of (seed, step, B)."""
        step = check_int("TextDataset", "step", step, 0)
        batch_size = check_int("TextDataset", "batch_size", batch_size, 1)
        starts = np.empty(batch_size, dtype=np.int64)
        window_starts(self.seed, TRAIN_WINDOWS, step * batch_size,
                      self.train_tokens.shape[0] - self.block_size, starts)
        windows = self.train_tokens[starts[:, None] + np.arange(self.block_size + 1)]
        windows = windows.astype(np.int64)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def eval_batches(self, batch_size: int):
        """Yield (x, y) of up to B windows covering the validation split once (see the module)."""
        batch_size = check_int("TextDataset", "batch_size", batch_size, 1)
        yield from fixed_windows(self.val_tokens, self.block_size, batch_size)

    @property
    def eval_windows(self) -> int:
        """Windows eval_batches yields: ceil((n_val - 1) / T)."""
        return -(-self.eval_tokens // self.block_size)

    def metrics(self, summed_loss: float, tokens: int) -> dict:
        """Loss, perplexity and (char and byte tokenizers) bits per byte of an evaluation.

        Bytes per token are the validation targets' own (exact when `tokens` is the whole
        evaluation, eval_tokens).
        """
        bytes_per_token = None if self.eval_bytes is None else self.eval_bytes / self.eval_tokens
        return language_model_metrics(summed_loss, tokens, bytes_per_token)

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy in nats of the ids of `split` ("train" or "val") counted as independent."""
        if split not in ("train", "val"):
            raise ValueError(f"TextDataset.unigram_entropy: split must be 'train' or 'val', "
                             f"got {split!r}")
        return unigram_entropy(self.train_counts if split == "train" else self.val_counts)


def fixed_windows(tokens: np.ndarray, block_size: int, batch_size: int):
    """Consecutive windows over `tokens` (n,): window w has x = tokens[wT : wT + T] and
    y = tokens[wT + 1 : wT + T + 1], so tokens[1:] are each a target exactly once; the last
    window's missing targets are IGNORE_INDEX (inputs 0). Yields (x, y) of up to batch_size
    windows, int64."""
    n_targets = tokens.shape[0] - 1
    n_windows = -(-n_targets // block_size)
    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        begin = first * block_size
        end = min(begin + rows * block_size + 1, tokens.shape[0])
        span = np.asarray(tokens[begin:end], dtype=np.int64)
        x = np.zeros(rows * block_size, dtype=np.int64)
        y = np.full(rows * block_size, IGNORE_INDEX, dtype=np.int64)
        x[:span.shape[0] - 1] = span[:-1]
        y[:span.shape[0] - 1] = span[1:]
        yield x.reshape(rows, block_size), y.reshape(rows, block_size)
