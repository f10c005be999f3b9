"""Incremental detokenization against whole decodes, on the tiny Qwen3-VL tokenizer.

The tokenizer is byte-level, so a token stream can form any byte sequence: characters
split across tokens (learned tokens that end mid-character, or single bytes), emoji, CJK,
special tokens in between (skipped), and bytes that are not UTF-8 at all. Both
detokenizers run: ``DecodeStream`` (what a fast tokenizer gets) and the offset windows
over ``tokenizer.decode`` (what any other tokenizer gets).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any
from unicodedata import normalize

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipelines.vlm import ChatItem
from pipelines.vlm_random import build_tokenizer
from pipelines.vlm_rows import OffsetDetokenizer, Row, StreamDetokenizer, detokenizer

# Characters of every UTF-8 length, combining marks, a ZWJ emoji sequence and a flag.
POOL = (list("abcxyz ,.!?\n\t0123456789") + list("éèçñüßøΩЖж") + list("图片猫这是中文日本語")
        + list("😀😃🧡💜🌧") + ["☀️", "👩‍💻", "🇫🇷", "e\u0301"])
SEEDS = range(300)

Detok = StreamDetokenizer | OffsetDetokenizer
KINDS: dict[str, Callable[[Any], Detok]] = {
    "decode_stream": lambda tok: StreamDetokenizer(tok.backend_tokenizer),
    "offset": lambda tok: OffsetDetokenizer(tok.decode),
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def token_pieces(tokenizer: Any) -> dict[str, int]:
    """Byte-level token strings (each char stands for one byte) -> id, without specials."""
    specials = set(tokenizer.all_special_ids)
    return {s: i for s, i in tokenizer.get_vocab().items() if i not in specials}


def random_tokenization(data: bytes, pieces: dict[str, int], rng: random.Random) -> list[int]:
    """Any segmentation of ``data`` into vocabulary tokens, not only the canonical one:
    at each byte a random token among those that match there (single bytes always do)."""
    byte_char = bytes_to_unicode()
    chars = "".join(byte_char[b] for b in data)
    longest = max(len(p) for p in pieces)
    ids, at = [], 0
    while at < len(chars):
        fits = [chars[at:at + n] for n in range(1, longest + 1)
                if chars[at:at + n] in pieces and at + n <= len(chars)]
        pick = rng.choice(fits)
        ids.append(pieces[pick])
        at += len(pick)
    return ids


def sprinkle_specials(ids: list[int], tokenizer: Any, rng: random.Random) -> list[int]:
    """Special tokens at random places, mid-character included: decoding skips them."""
    out = list(ids)
    for _ in range(rng.randint(0, 4)):
        out.insert(rng.randint(0, len(out)), rng.choice(tokenizer.all_special_ids))
    return out


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(POOL) for _ in range(rng.randint(1, 40)))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def run(detok: Detok, ids: list[int]) -> tuple[list[str], str]:
    pieces = [detok.step(token) for token in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_valid_utf8_streams_decode_exactly_and_never_emit_half_a_character(
        tokenizer: Any, kind: str) -> None:
    pieces_of = token_pieces(tokenizer)
    specials = set(tokenizer.all_special_ids)
    waited = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        text = random_text(rng)
        ids = sprinkle_specials(random_tokenization(text.encode(), pieces_of, rng),
                                tokenizer, rng)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert whole == text  # the stream is the text, specials skipped
        pieces, rest = run(KINDS[kind](tokenizer), ids)
        assert rest == ""  # valid UTF-8: nothing is left over at the end
        assert "".join(pieces) == whole
        assert not any("\ufffd" in p for p in pieces)
        # A text token that let nothing out held part of a character.
        waited += any(p == "" and t not in specials for p, t in zip(pieces, ids, strict=True))
    assert waited > len(SEEDS) // 2  # characters did arrive in parts


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_encodings_decode_exactly(tokenizer: Any, kind: str) -> None:
    for seed in SEEDS:
        text = random_text(random.Random(seed))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces, rest = run(KINDS[kind](tokenizer), ids)
        # Encoding normalizes to NFC (Qwen's tokenizer does): e + U+0301 comes back as é.
        assert "".join(pieces) + rest == tokenizer.decode(ids) == normalize("NFC", text)


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_bytes_never_crash_and_end_as_the_whole_decode(
        tokenizer: Any, kind: str) -> None:
    """Bytes that are not UTF-8 decode to U+FFFD, the way a whole decode replaces them;
    what a stream lets out plus what it flushes at the end is exactly the whole decode."""
    pieces_of = token_pieces(tokenizer)
    for seed in SEEDS:
        rng = random.Random(seed)
        data = bytearray(random_text(rng).encode())
        for _ in range(rng.randint(1, 4)):  # stray bytes: lead bytes, continuations, 0xFF
            data.insert(rng.randint(0, len(data)), rng.choice([0x80, 0xBF, 0xC3, 0xE4,
                                                               0xF0, 0xFF]))
        if is_utf8(bytes(data)):  # two strays happened to make a character
            data.append(0xF0)
        ids = sprinkle_specials(random_tokenization(bytes(data), pieces_of, rng),
                                tokenizer, rng)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "\ufffd" in whole
        pieces, rest = run(KINDS[kind](tokenizer), ids)
        assert "".join(pieces) + rest == whole


@pytest.mark.parametrize("kind", KINDS)
def test_a_real_replacement_character_at_the_end_is_flushed(tokenizer: Any, kind: str) -> None:
    ids = tokenizer("ok \ufffd", add_special_tokens=False)["input_ids"]
    pieces, rest = run(KINDS[kind](tokenizer), ids)
    assert "".join(pieces) + rest == "ok \ufffd"


def test_rows_stream_the_whole_decode(tokenizer: Any) -> None:
    """Through a row (the fast tokenizer picks DecodeStream): the final text is the whole
    decode and the streamed pieces add up to it, for valid and invalid streams alike."""
    assert isinstance(detokenizer(tokenizer), StreamDetokenizer)
    pieces_of = token_pieces(tokenizer)
    for seed in SEEDS:
        rng = random.Random(seed)
        data = bytearray(random_text(rng).encode())
        if seed % 2:
            data.insert(rng.randint(0, len(data)), 0xE4)  # half a CJK character
        ids = sprinkle_specials(random_tokenization(bytes(data), pieces_of, rng),
                                tokenizer, rng)
        streamed: list[str] = []
        row = Row(ChatItem(messages=[], max_tokens=len(ids), on_text=streamed.append),
                   tokenizer, eos={-1})
        for token in ids:
            row.push(token)
        assert row.finish == "length"
        assert row.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(streamed) == row.text
