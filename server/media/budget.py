"""How many decoded pixels the server holds at once, across all requests.

Each image under the caps (media.max_pixels, 40M) is allowed; eight of them in each of a
few concurrent requests are not, all at once: decoded, a 40M-pixel image is 160 MB (Pillow
keeps RGB in 32 bits), and the box would swap (measured: four such requests took the
server from 0.5 to 3.6 GB). Every image that enters the server is decoded (and fitted to
what it is for) inside ``PixelBudget.run``: it waits, first come first served, until its
pixels fit, for at most ``wait_s``, then its request gets a 429 to retry. The decode runs
in a worker thread, never on the event loop, and the pixels count until that thread is
done with them, even when the request that asked has gone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from server.errors import APIError
from server.retry_after import retry_headers

T = TypeVar("T")


class PixelBudget:
    """``capacity`` pixels in flight; an image bigger than all of it waits for all of it."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def run(self, pixels: int, work: Callable[[], T], *, param: str | None = None) -> T:
        """``work()`` in a worker thread, once ``pixels`` fit in the budget."""
        cost = min(max(pixels, 1), self.capacity)
        await self._admit(cost, param)
        try:
            done = asyncio.get_running_loop().run_in_executor(None, work)
        except BaseException:
            self._release(cost)
            raise

        def finished(future: asyncio.Future[T]) -> None:
            self._release(cost)
            if not future.cancelled():
                future.exception()  # seen, even when no request is left to see it

        # Released when the thread finishes, not when the request stops waiting: the
        # shield keeps a leaving request from cancelling a decode that holds memory.
        done.add_done_callback(finished)
        return await asyncio.shield(done)

    async def _admit(self, cost: int, param: str | None) -> None:
        if not self._waiting and self.in_use + cost <= self.capacity:
            self.in_use += cost
            return
        entry = (cost, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(self.wait_s):
                await entry[1]
        except BaseException as exc:
            granted = entry[1].done() and not entry[1].cancelled()
            if granted:  # admitted just as it gave up: give the room back
                self._release(cost)
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # it may have been the head that held the others back
            if isinstance(exc, TimeoutError):
                raise self._busy(param) from None
            raise

    def _release(self, cost: int) -> None:
        self.in_use -= cost
        self._grant()

    def _grant(self) -> None:
        # Strictly in order: a large image at the head is not starved by small ones.
        while self._waiting:
            cost, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if self.in_use + cost > self.capacity:
                return
            self._waiting.popleft()
            self.in_use += cost
            future.set_result(None)

    def _busy(self, param: str | None) -> APIError:
        return APIError(429, f"The server is decoding as many image pixels as it has "
                        f"memory for; this image waited {self.wait_s:g} s. Retry shortly.",
                        type="rate_limit_error", param=param, code="intake_busy",
                        headers=retry_headers(1.0))
