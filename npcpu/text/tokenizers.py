"""Tokenizers, text <-> ids: char-level, byte-level, and BPE through the `tokenizers` package.

Every tokenizer has one small interface:

    tokenizer.kind                  "char", "byte" or "bpe"
    tokenizer.vocab_size            V: ids are in [0, V)
    tokenizer.encode(text)          1-D int64 array of ids
    tokenizer.decode(ids)           the text (ids: any sequence of ints)
    tokenizer.to_json()             the tokenizer as a JSON string; save(path) writes it
    load_tokenizer(path)            reads any of them back (never pickle)
    tokenizer.token_byte_lengths()  (V,) UTF-8 bytes of each token, or None when a token is not
                                    a fixed byte string (BPE): bits per byte need it
    tokenizer.context_free          True when encode(a + b) == encode(a) + encode(b) for any split
                                    (char and byte), so text may be cut anywhere into chunks

Char and byte tokenizers are written as {"npcpu_tokenizer": kind, ...}. A BPE tokenizer is saved
in the `tokenizers` library's own tokenizer.json format, so a tokenizer.json made elsewhere (for
example GPT-2's) loads too; its round trip is then whatever that tokenizer's normalizer allows.

Char-level ids follow nanoGPT's shakespeare_char: the distinct characters of the data, sorted by
code point, numbered from 0. Byte-level ids are the UTF-8 bytes; decoding ids that are not valid
UTF-8 (a model's sample may cut a character) gives U+FFFD for the broken bytes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from npcpu.checks import check_int, parse_json

TOKENIZER_KINDS = ("char", "byte", "bpe")
_CODE_POINTS = 0x110000
_MISSING_TOKENIZERS = ("BPE needs the `tokenizers` package, an optional extra of npcpu: "
                       "pip install 'npcpu[text]' (or pip install 'tokenizers>=0.15')")


def _code_points(text: str) -> np.ndarray:
    """The code points of `text` as a uint32 array (lone surrogates kept, as Python keeps them)."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def _check_ids(owner: str, ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:
        return ids.astype(np.int64).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{owner}.decode: ids must be integers, got dtype {ids.dtype}")
    ids = ids.reshape(-1)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{owner}.decode: id {int(bad[0])} is outside the vocabulary "
                         f"[0, {vocab_size})")
    return ids.astype(np.int64, copy=False)


class CharTokenizer:
    """One id per character; the vocabulary is a list of characters, id = position.

    Parameters
    ----------
    chars : sequence of str
        The vocabulary, each entry one character (code point), no duplicates.
    """

    kind = "char"
    context_free = True

    def __init__(self, chars):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer: each vocabulary entry must be one character, "
                                 f"got {c!r}")
        if not chars:
            raise ValueError("CharTokenizer: the vocabulary is empty")
        self.chars = chars
        points = np.array([ord(c) for c in chars], dtype=np.int64)
        # id of each code point up to the largest in the vocabulary, -1 for none: encoding is
        # then one gather (a table of at most 0x110000 entries)
        self._id_of_point = np.full(points.max() + 1, -1, dtype=np.int64)
        self._id_of_point[points] = np.arange(len(chars))
        if np.count_nonzero(self._id_of_point >= 0) != len(chars):
            first_repeat = next(c for i, c in enumerate(chars) if c in chars[:i])
            raise ValueError(f"CharTokenizer: character {first_repeat!r} appears twice in the "
                             f"vocabulary")

    @classmethod
    def from_texts(cls, texts) -> "CharTokenizer":
        """The vocabulary of the distinct characters of all `texts` (an iterable of str), sorted."""
        seen = np.zeros(_CODE_POINTS, dtype=bool)
        for text in texts:
            seen[_code_points(text)] = True
        return cls([chr(p) for p in np.flatnonzero(seen)])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        points = _code_points(text)
        ids = self._id_of_point[np.minimum(points, self._id_of_point.shape[0] - 1)]
        unknown = (ids < 0) | (points >= self._id_of_point.shape[0])
        if unknown.any():
            first = int(np.argmax(unknown))
            raise ValueError(f"CharTokenizer.encode: character {chr(points[first])!r} at "
                             f"position {first} is not in the vocabulary of {self.vocab_size} "
                             f"characters")
        return ids

    def decode(self, ids) -> str:
        return "".join([self.chars[i] for i in _check_ids("CharTokenizer", ids,
                                                          self.vocab_size).tolist()])

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", errors="surrogatepass")) for c in self.chars],
                        dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"npcpu_tokenizer": "char", "chars": self.chars}, ensure_ascii=True)

    def save(self, path) -> None:
        _write_text(path, self.to_json())


class ByteTokenizer:
    """The UTF-8 bytes of the text as ids: 256 of them, nothing to train."""

    kind = "byte"
    context_free = True
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = _check_ids("ByteTokenizer", ids, 256)
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"npcpu_tokenizer": "byte"})

    def save(self, path) -> None:
        _write_text(path, self.to_json())


def _tokenizers_library():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(_MISSING_TOKENIZERS) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme) held by a `tokenizers.Tokenizer`.

    Byte-level pre-tokenization maps every UTF-8 byte to a symbol of the initial alphabet, so any
    text encodes (no unknown token) and decodes back exactly. Built by `train`, or wrapping an
    existing `tokenizers.Tokenizer` (see `load_tokenizer`).
    """

    kind = "bpe"
    context_free = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        """Learn `vocab_size` tokens (>= 256, the byte alphabet) from `texts`, an iterable of str
        consumed once (chunks of a large file are fine)."""
        vocab_size = check_int("BPETokenizer", "vocab_size (the byte alphabet and merges)",
                               vocab_size, 256)
        lib = _tokenizers_library()
        tokenizer = lib.Tokenizer(lib.models.BPE())
        tokenizer.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = lib.decoders.ByteLevel()
        trainer = lib.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[], show_progress=False,
            initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(_check_ids("BPETokenizer", ids,
                                                self.vocab_size).tolist())

    def token_byte_lengths(self) -> None:
        return None

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path) -> None:
        _write_text(path, self.to_json())


def _write_text(path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def tokenizer_from_json(text: str, source: str = "tokenizer JSON"):
    """A tokenizer from the JSON `to_json` wrote, or from a `tokenizers` library tokenizer.json."""
    spec = parse_json(text, source)
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(spec).__name__}")
    kind = spec.get("npcpu_tokenizer")
    if kind == "char":
        if not isinstance(spec.get("chars"), (list, str)):
            raise ValueError(f"{source}: a char tokenizer needs 'chars', a list of characters, "
                             f"got {spec.get('chars')!r}")
        try:
            return CharTokenizer(spec["chars"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind is not None:
        raise ValueError(f"{source}: unknown tokenizer kind {kind!r}, expected one of "
                         f"{TOKENIZER_KINDS}")
    if "model" not in spec:
        raise ValueError(f"{source}: neither an npcpu tokenizer nor a `tokenizers` "
                         f"tokenizer.json (no 'npcpu_tokenizer' or 'model' key)")
    library = _tokenizers_library()
    try:
        return BPETokenizer(library.Tokenizer.from_str(text))
    except Exception as e:  # the library raises its own exception type
        raise ValueError(f"{source}: the tokenizers library cannot read it ({e})") from None


def load_tokenizer(path):
    """Read a tokenizer saved by `save` (char, byte, bpe) or any `tokenizers` tokenizer.json."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return tokenizer_from_json(text, source=path)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (their JSON descriptions agree)."""
    return a.kind == b.kind and json.loads(a.to_json()) == json.loads(b.to_json())
