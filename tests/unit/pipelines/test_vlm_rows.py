"""Per-row decoding: limits, stop strings, and what streaming lets out (no model)."""

from __future__ import annotations

from pipelines.vlm import ChatItem, _Row, fit_pixels


class ByteTokenizer:
    """Token i is byte i; decoding behaves like a byte-level BPE (bad UTF-8 -> U+FFFD)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


EOS = 999


def run(item: ChatItem, text: bytes, eos: bool = False) -> tuple[_Row, list[str]]:
    pieces: list[str] = []
    item.on_text = pieces.append
    row = _Row(item, ByteTokenizer(), {EOS})
    for token in [*text, *([EOS] if eos else [])]:
        row.push(token)
    return row, pieces


def item(**kw: object) -> ChatItem:
    return ChatItem(messages=[{"role": "user", "content": "x"}], **kw)  # type: ignore[arg-type]


def test_max_tokens_ends_with_length() -> None:
    row, pieces = run(item(max_tokens=3), b"abcdef")
    assert (row.text, row.finish, len(row.ids)) == ("abc", "length", 3)
    assert "".join(pieces) == "abc"


def test_eos_ends_with_stop_and_is_not_text() -> None:
    row, pieces = run(item(max_tokens=10), b"hi", eos=True)
    assert (row.text, row.finish) == ("hi", "stop")
    assert "".join(pieces) == "hi"


def test_stop_string_is_cut_and_never_streamed() -> None:
    row, pieces = run(item(max_tokens=50, stop=("END",)), b"one ENtwo END three")
    assert (row.text, row.finish) == ("one ENtwo ", "stop")
    assert "".join(pieces) == "one ENtwo "
    assert not any("END" in p for p in pieces)


def test_half_a_utf8_character_waits_for_the_rest() -> None:
    row, pieces = run(item(max_tokens=50), "héllo ✓".encode())
    assert row.text == "héllo ✓"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "héllo ✓"


def test_tokens_after_finish_are_ignored() -> None:
    row, _ = run(item(max_tokens=2), b"ab")
    row.push(ord("c"))
    assert row.text == "ab" and len(row.ids) == 2


def test_a_cancelled_row_stops_at_its_next_token() -> None:
    import threading

    gone = threading.Event()
    row = _Row(item(max_tokens=50, cancel=gone), ByteTokenizer(), {EOS})
    row.push(ord("a"))
    gone.set()
    row.push(ord("b"))
    assert (row.text, row.finish) == ("a", "stop")


def test_fit_pixels_scales_down_only() -> None:
    from PIL import Image

    big = Image.new("RGB", (4000, 1000))
    small = fit_pixels(big, 1000 * 1000)
    assert small.width * small.height <= 1000 * 1000
    assert abs(small.width / small.height - 4) < 0.02
    tiny = Image.new("RGB", (10, 10))
    assert fit_pixels(tiny, 10**6) is tiny
