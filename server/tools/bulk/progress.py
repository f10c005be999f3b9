"""Progress: messages, and a self-rewriting line on stderr with the rate and the ETA."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


class Reporter:
    """Messages through ``echo``, and one self-rewriting progress line on stderr."""

    def __init__(self, echo: Callable[[str], None], progress: bool, total: int) -> None:
        self.echo = echo
        self.progress = progress and total > 0
        self.total = total
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()
        self.lock = threading.RLock()
        self._width = 0
        self._drawn_at = 0.0
        self._drawn = (-1, -1)

    def restart(self) -> None:
        """Rates count from here (after the model has loaded)."""
        with self.lock:
            self.start = time.monotonic()

    def say(self, message: str) -> None:
        with self.lock:
            self._clear()
            self.echo(message)

    def count(self, written: int = 0, failed: int = 0) -> None:
        with self.lock:
            self.done += written
            self.failed += failed
            now = time.monotonic()
            if now - self._drawn_at >= 0.2 or self.done + self.failed >= self.total:
                self._draw(now)

    def _draw(self, now: float) -> None:
        if not self.progress:
            return
        self._drawn_at = now
        self._drawn = (self.done, self.failed)
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done - self.failed
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        text = f"{self.done + self.failed}/{self.total} images, {rate:.1f} images/s, ETA {eta}"
        if self.failed:
            text += f", {self.failed} failed"
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)

    def _clear(self) -> None:
        if self.progress and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0

    def finish(self) -> None:
        with self.lock:
            if self.progress and self._width:
                if self._drawn != (self.done, self.failed):
                    self._draw(time.monotonic())
                sys.stderr.write("\n")
                sys.stderr.flush()
                self._width = 0
