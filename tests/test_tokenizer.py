"""The real Grok-1 tokenizer: ids identical to the reference encodings; streaming decode."""

from __future__ import annotations

import json
import random

import pytest

from conftest import TOKENIZER_DIR
from grok1.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER_DIR / "tokenizer.model")


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return json.loads((TOKENIZER_DIR / "cases.json").read_text())["cases"]


def test_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 131072
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_reference_encodings(tok, cases):
    assert len(cases) == 42
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        if case["roundtrip_equal"]:
            assert tok.decode(tok.encode(case["text"])) == case["text"]
        assert tok.decode(case["ids"]) == case["decoded"]


def test_no_bos_by_default_like_the_official_runner(tok):
    assert tok.encode("Hello")[0] != tok.bos_id
    assert tok.encode("Hello", add_bos=True)[0] == tok.bos_id


def _streamed(tok: Tokenizer, ids: list[int], at_start: bool = True) -> str:
    decoder = tok.stream_decoder(at_start=at_start)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def test_stream_decoder_equals_decode_on_reference_cases(tok, cases):
    for case in cases:
        assert _streamed(tok, case["ids"]) == case["decoded"], case["text"]


def test_stream_decoder_equals_decode_on_random_ids(tok):
    rng = random.Random(1234)
    for _ in range(1500):
        # Mix common ids, special/user-defined/byte ids (0..400) and the whole vocabulary.
        ids = [rng.randrange(400) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 9))]
        assert _streamed(tok, ids) == tok.decode(ids), ids


def test_byte_fallback_characters_are_held_until_complete(tok):
    ids = tok.encode("नमस्ते")
    decoder = tok.stream_decoder()
    outputs = [decoder.push(i) for i in ids]
    assert "".join(outputs) + decoder.flush() == "नमस्ते"
    assert all("\ufffd" not in piece for piece in outputs)  # no half characters leak out


def test_continuation_keeps_its_leading_space(tok):
    prompt = tok.encode("The answer is")
    full = tok.encode("The answer is 42 exactly")
    continuation = full[len(prompt):]
    assert _streamed(tok, continuation, at_start=False) == " 42 exactly"
    assert tok.decode(full) == "The answer is 42 exactly"
