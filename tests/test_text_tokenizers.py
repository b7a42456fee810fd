"""Tokenizers: round trips of arbitrary Unicode, vocabularies, JSON save/load, BPE."""

import inspect
import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npcpu.text.tokenizers import (BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer,
                                   same_tokenizer, tokenizer_from_json)

try:
    import tokenizers  # noqa: F401
    HAVE_TOKENIZERS = True
except ImportError:
    HAVE_TOKENIZERS = False
needs_tokenizers = pytest.mark.skipif(not HAVE_TOKENIZERS, reason="the optional `tokenizers` "
                                      "package is not installed (pip install 'npcpu[text]')")

# Any code point but lone surrogates, which are not text (UTF-8 cannot hold them).
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def stdlib_source() -> str:
    return open(inspect.getsourcefile(json), encoding="utf-8").read()


@pytest.fixture(scope="module")
def bpe():
    if not HAVE_TOKENIZERS:
        pytest.skip("the optional `tokenizers` package is not installed")
    return BPETokenizer.train([stdlib_source()], vocab_size=400)


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_char_round_trip(text):
    tokenizer = CharTokenizer.from_texts([text, "a"])
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_byte_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


@needs_tokenizers
@settings(max_examples=200, deadline=None)
@given(text=unicode_text)
def test_bpe_round_trip_of_text_it_never_saw(bpe, text):
    ids = bpe.encode(text)
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < bpe.vocab_size)
    assert bpe.decode(ids) == text


def test_char_vocabulary_is_sorted_distinct_characters_as_in_nanogpt():
    text = "hello, world\n"
    tokenizer = CharTokenizer.from_texts(["hello, ", "world\n"])
    assert tokenizer.chars == sorted(set(text))
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert tokenizer.encode(text).tolist() == [stoi[c] for c in text]
    assert tokenizer.vocab_size == len(set(text))
    assert tokenizer.token_byte_lengths().tolist() == [1] * len(set(text))
    assert CharTokenizer(["é", "€", "🙂"]).token_byte_lengths().tolist() == [2, 3, 4]


def test_byte_vocabulary():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.encode("é").tolist() == [0xC3, 0xA9]
    assert tokenizer.decode(np.arange(128)) == bytes(range(128)).decode("ascii")
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a cut character from a sample stays decodable


def test_char_errors_name_the_problem():
    tokenizer = CharTokenizer.from_texts(["abc"])
    with pytest.raises(ValueError, match=r"character 'z' at position 1 is not in the vocab"):
        tokenizer.encode("az")
    with pytest.raises(ValueError, match=r"id 3 is outside the vocabulary \[0, 3\)"):
        tokenizer.decode([0, 3])
    with pytest.raises(TypeError, match="ids must be integers"):
        tokenizer.decode(np.array([0.5]))
    with pytest.raises(ValueError, match="'a' appears twice"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="one character"):
        CharTokenizer(["ab"])


def test_save_load_is_json_and_round_trips(tmp_path, bpe):
    for tokenizer in (CharTokenizer.from_texts(["xyz\u00e9\U0001F642"]), ByteTokenizer(), bpe):
        path = tmp_path / f"{tokenizer.kind}.json"
        tokenizer.save(path)
        json.loads(path.read_text(encoding="utf-8"))  # plain JSON, no pickle
        loaded = load_tokenizer(path)
        assert loaded.kind == tokenizer.kind and loaded.vocab_size == tokenizer.vocab_size
        assert same_tokenizer(loaded, tokenizer)
        text = "xyz\u00e9\U0001F642" if tokenizer.kind == "char" else "any text: \u00e9\u20ac"
        assert loaded.encode(text).tolist() == tokenizer.encode(text).tolist()


@needs_tokenizers
def test_an_existing_tokenizer_json_of_the_library_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    made_elsewhere = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2},
                                                unk_token="[UNK]"))
    made_elsewhere.pre_tokenizer = pre_tokenizers.Whitespace()
    made_elsewhere.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.kind == "bpe" and loaded.vocab_size == 3
    assert loaded.encode("hello world there").tolist() == [0, 1, 2]


def test_same_tokenizer_tells_vocabularies_apart():
    assert same_tokenizer(CharTokenizer.from_texts(["ab"]), CharTokenizer(["a", "b"]))
    assert not same_tokenizer(CharTokenizer.from_texts(["ab"]), CharTokenizer(["b", "a"]))
    assert not same_tokenizer(CharTokenizer.from_texts(["ab"]), ByteTokenizer())


def test_bad_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenizer_from_json("{", "x.json")
    with pytest.raises(ValueError, match="unknown tokenizer kind 'word'"):
        tokenizer_from_json('{"npcpu_tokenizer": "word"}', "x.json")
    with pytest.raises(ValueError, match="neither an npcpu tokenizer nor"):
        tokenizer_from_json('{"vocab": []}', "x.json")


def test_bpe_without_the_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now fails
    with pytest.raises(ImportError, match=r"npcpu\[text\]"):
        BPETokenizer.train(["some text"], vocab_size=300)


@needs_tokenizers
def test_bpe_vocab_size_below_the_byte_alphabet_is_refused():
    with pytest.raises(ValueError, match=">= 256"):
        BPETokenizer.train(["text"], vocab_size=100)
