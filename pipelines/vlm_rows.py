"""One generate row's decoding: its tokens to text incrementally (no re-decoding of the
whole row per token), stop strings, limits, streaming; and the stopping criterion that
feeds a batch's new tokens to its rows (pipelines/vlm.py runs them)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import StoppingCriteria

log = logging.getLogger(__name__)


class RowRequest(Protocol):
    """What a row needs of its request (``pipelines.vlm.ChatItem`` is one)."""

    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def on_text(self) -> Callable[[str], None] | None: ...
    @property
    def cancel(self) -> threading.Event | None: ...


class StreamDetokenizer:
    """Incremental decoding with the fast tokenizer's own ``DecodeStream``: each token costs
    a decode of a few tokens, not of the whole row, and a piece comes out only once its
    characters are whole (a character split across byte-level tokens waits)."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.chars = 0  # how much of the row's text has come out
        self.held = False  # tokens in that have not come out as text yet
        self.broken = False

    def step(self, token: int) -> str:
        self.ids.append(token)
        piece = None
        if not self.broken:
            try:
                piece = self.stream.step(self.backend, token)
            except Exception:  # a decoder whose text is not prefix-stable: flush() catches up
                log.debug("DecodeStream gave up on a row", exc_info=True)
                self.broken = True
        self.held = piece is None
        self.chars += len(piece or "")
        return piece or ""

    def flush(self) -> str:
        """The rest of the text when no more tokens come: an unfinished character, or text
        that ends in U+FFFD and so looked unfinished. One whole decode, once per row."""
        if not self.held:
            return ""
        self.held = False
        text: str = self.backend.decode(self.ids, skip_special_tokens=True)
        rest, self.chars = text[self.chars:], len(text)
        return rest


class OffsetDetokenizer:
    """The same for any tokenizer with only ``decode``: decode a short window (the tokens
    of the last piece as context, then the new ones) and let out what it adds, once it
    no longer ends in half a character (U+FFFD)."""

    def __init__(self, decode: Callable[..., str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: context for how the next tokens join on
        self.read = 0  # text of ids[:read] has come out

    def _window(self, end: int) -> str:
        return self.decode(self.ids[self.prefix:end], skip_special_tokens=True)

    def step(self, token: int) -> str:
        self.ids.append(token)
        seen, now = self._window(self.read), self._window(len(self.ids))
        if len(now) <= len(seen) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(seen):]

    def flush(self) -> str:
        rest = self._window(len(self.ids))[len(self._window(self.read)):]
        self.prefix = self.read = len(self.ids)
        return rest


def detokenizer(tokenizer: Any) -> StreamDetokenizer | OffsetDetokenizer:
    """Incremental decoding for a row: DecodeStream on a fast tokenizer's backend, else
    windows of ``tokenizer.decode``. Special tokens are skipped; no clean-up of spaces
    (the Qwen tokenizers have it off)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return StreamDetokenizer(backend)
    return OffsetDetokenizer(tokenizer.decode)


class Row:
    """Decoding state of one row: its tokens, its text, what it has streamed.

    The text grows a piece at a time. The last ``hold`` characters (one less than the
    longest stop string) stay in ``tail``, where a stop string that is still forming can
    be cut; the rest is settled, streamed, and never looked at again: O(1) per token.
    """

    def __init__(self, item: RowRequest, tokenizer: Any, eos: set[int]) -> None:
        self.item = item
        self.eos = eos
        self.detok = detokenizer(tokenizer)
        self.ids: list[int] = []
        self.settled: list[str] = []
        self.tail = ""
        self.finish: str | None = None
        self.hold = max((len(s) for s in item.stop), default=1) - 1

    @property
    def text(self) -> str:
        return "".join(self.settled) + self.tail

    def push(self, token: int) -> None:
        if self.finish is not None:
            return
        if self.item.cancel is not None and self.item.cancel.is_set():
            self.finish = "stop"  # nobody reads the rest
            return
        if token in self.eos:
            self.end("stop")
            return
        self.ids.append(token)
        self._add(self.detok.step(token))
        if self.finish is None and len(self.ids) >= self.item.max_tokens:
            self.end("length")

    def end(self, reason: str) -> str:
        """No more tokens: what the detokenizer still holds joins the text, all of it goes
        out. Returns the verdict (a stop string in that last text makes it "stop")."""
        self._add(self.detok.flush())
        if self.finish is None:
            self.finish = reason
            self._settle(keep=0)
        return self.finish

    def _add(self, piece: str) -> None:
        if not piece or self.finish is not None:
            return
        # A stop string that ends in this piece starts at most `hold` characters before it,
        # inside the tail; one that ended earlier was cut then.
        self.tail += piece
        found = [at for at in (self.tail.find(s) for s in self.item.stop) if at >= 0]
        if found:
            self.tail, self.finish = self.tail[:min(found)], "stop"
            self._settle(keep=0)
        else:
            self._settle(keep=self.hold)

    def _settle(self, keep: int) -> None:
        done = len(self.tail) - keep
        if done <= 0:
            return
        piece, self.tail = self.tail[:done], self.tail[done:]
        self.settled.append(piece)
        if self.item.on_text is not None:
            self.item.on_text(piece)


class RowStops(StoppingCriteria):  # type: ignore[misc]
    """Feeds each new token to its row and stops rows at their own limits."""

    def __init__(self, rows: list[Row], prompt_len: int) -> None:
        self.rows = rows
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_len:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                row.push(token)
        done = [row.finish is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
