"""Per-row decoding: limits, stop strings, and what streaming lets out (no model).

Each test runs twice: with a fake tokenizer that only has ``decode`` (the offset
detokenizer) and with the tiny Qwen3-VL tokenizer fed one byte-level token per byte
(``DecodeStream``), so characters always arrive a byte at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipelines.vlm import ChatItem, fit_pixels
from pipelines.vlm_random import build_tokenizer
from pipelines.vlm_rows import Row


class ByteTokenizer:
    """Token i is byte i; decoding behaves like a byte-level BPE (bad UTF-8 -> U+FFFD)."""

    def __init__(self) -> None:
        self.decoded = 0  # how many token ids all decode calls together were given

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


@dataclass
class Tok:
    tokenizer: Any
    encode: Callable[[bytes], list[int]]  # one token per byte
    eos: int


@pytest.fixture(scope="module")
def qwen() -> Any:
    return build_tokenizer()


@pytest.fixture(params=["decode_only", "qwen3_vl"])
def tok(request: pytest.FixtureRequest, qwen: Any) -> Tok:
    if request.param == "decode_only":
        return Tok(ByteTokenizer(), list, 999)
    byte_ids = [qwen.convert_tokens_to_ids(c) for c in bytes_to_unicode().values()]
    by_byte = dict(zip(bytes_to_unicode(), byte_ids, strict=True))
    return Tok(qwen, lambda data: [by_byte[b] for b in data], qwen.eos_token_id)


def run(tok: Tok, item: ChatItem, text: bytes, eos: bool = False) -> tuple[Row, list[str]]:
    pieces: list[str] = []
    item.on_text = pieces.append
    row = Row(item, tok.tokenizer, {tok.eos})
    for token in [*tok.encode(text), *([tok.eos] if eos else [])]:
        row.push(token)
    return row, pieces


def item(**kw: object) -> ChatItem:
    return ChatItem(messages=[{"role": "user", "content": "x"}], **kw)  # type: ignore[arg-type]


def test_max_tokens_ends_with_length(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=3), b"abcdef")
    assert (row.text, row.finish, len(row.ids)) == ("abc", "length", 3)
    assert "".join(pieces) == "abc"


def test_eos_ends_with_stop_and_is_not_text(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=10), b"hi", eos=True)
    assert (row.text, row.finish) == ("hi", "stop")
    assert "".join(pieces) == "hi"


def test_stop_string_is_cut_and_never_streamed(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=50, stop=("END",)), b"one ENtwo END three")
    assert (row.text, row.finish) == ("one ENtwo ", "stop")
    assert "".join(pieces) == "one ENtwo "
    assert not any("END" in p for p in pieces)


def test_the_earliest_of_several_stop_strings_cuts(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=80, stop=("世界", "lo w")),
                      "hello world 世界".encode())
    assert (row.text, row.finish) == ("hel", "stop")
    assert "".join(pieces) == "hel"


def test_a_multibyte_stop_string_spanning_tokens_is_cut(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=80, stop=("界!",)), "你好世界!再见".encode())
    assert (row.text, row.finish) == ("你好世", "stop")
    assert "".join(pieces) == "你好世"


def test_streaming_holds_back_only_what_a_stop_string_could_still_become(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=6, stop=("xyz",)), b"abcdef")
    assert pieces[:2] == ["a", "b"]  # out as soon as no stop string can start there
    assert (row.text, "".join(pieces)) == ("abcdef", "abcdef")  # the rest at the end


def test_half_a_utf8_character_waits_for_the_rest(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=50), "héllo ✓ 😀".encode())
    assert row.text == "héllo ✓ 😀"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "héllo ✓ 😀"


def test_a_row_cut_mid_character_by_max_tokens_ends_as_a_whole_decode_would(tok: Tok) -> None:
    row, pieces = run(tok, item(max_tokens=4), "ab✓".encode())  # two of ✓'s three bytes
    assert (row.text, row.finish) == ("ab\ufffd", "length")
    assert "".join(pieces) == "ab\ufffd"


def test_tokens_after_finish_are_ignored(tok: Tok) -> None:
    row, _ = run(tok, item(max_tokens=2), b"ab")
    row.push(tok.encode(b"c")[0])
    assert row.text == "ab" and len(row.ids) == 2


def test_a_cancelled_row_stops_at_its_next_token(tok: Tok) -> None:
    gone = threading.Event()
    row = Row(item(max_tokens=50, cancel=gone), tok.tokenizer, {tok.eos})
    row.push(tok.encode(b"a")[0])
    gone.set()
    row.push(tok.encode(b"b")[0])
    assert (row.text, row.finish) == ("a", "stop")


def test_decoding_work_grows_linearly_with_the_answer() -> None:
    """Each token decodes a short window, not the whole row (which was O(n^2))."""
    tokenizer = ByteTokenizer()
    text = ("Streaming text, with ünïcödé and 中文 and 😀, " * 60).encode()
    row = Row(item(max_tokens=len(text), stop=("never here",)), tokenizer, {999})
    for token in text:
        row.push(token)
    assert row.text == text.decode()
    assert tokenizer.decoded < 10 * len(text)


def test_fit_pixels_scales_down_only() -> None:
    from PIL import Image

    big = Image.new("RGB", (4000, 1000))
    small = fit_pixels(big, 1000 * 1000)
    assert small.width * small.height <= 1000 * 1000
    assert abs(small.width / small.height - 4) < 0.02
    tiny = Image.new("RGB", (10, 10))
    assert fit_pixels(tiny, 10**6) is tiny
