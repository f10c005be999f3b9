"""The local vision-language model: its batcher, and streaming from the device thread (in
this process) or from the VLM engine workers (server/providers/local/engine.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipelines.registry import WeightsInfo
from pipelines.vlm import ChatItem, ChatResult, Prompts
from server.errors import queue_full, shutting_down
from server.providers.local.batcher import (
    Batcher,
    BatchPolicy,
    Closed,
    QueueFull,
    Timing,
    from_batch_failure,
    timing_of,
)
from server.providers.local.engine import ChatProcess


@dataclass(frozen=True)
class StreamEvent:
    text: str = ""
    result: ChatResult | None = None  # set on the last event
    timing: Timing | None = None


class LocalChat:
    """Chat jobs on the local VLM behind one batcher: ``generate`` in this process (on the
    batcher's thread), or ``workers``, VLM engine worker processes, one batcher thread
    each. ``prompts``, the model's processor side (no weights), admits items in the
    server: it prepares them and counts their prompt tokens."""

    def __init__(self, model_id: str, weights: WeightsInfo,
                 generate: Callable[[list[ChatItem]], list[ChatResult]] | None,
                 prompts: Prompts, policy: BatchPolicy, timeout_s: float,
                 description: str = "", *, workers: Sequence[ChatProcess] = ()) -> None:
        self.model_id = model_id
        self.weights = weights
        self.description = description
        self.prompts = prompts
        self.context_length = prompts.context_length
        self.timeout_s = timeout_s
        self.workers = list(workers)
        self.batcher: Batcher[ChatItem, ChatResult] = Batcher(
            model_id, generate, policy, default_item_s=1.0, runners=self.workers)

    def start(self) -> None:
        self.batcher.start()

    def count_tokens(self, item: ChatItem) -> int:
        """The item's prompt tokens, counted on its model inputs, which this prepares (its
        images through the image processor, its prompt tokenized with their placeholders
        expanded) unless it came prepared: admission calls this on a server thread, so
        that no batch waits on that work on its device's thread."""
        if item.prepared is None:
            # Only where the prepared arrays are no bigger than the pictures: they wait in
            # the queue and cross the pipe. At Qwen3-VL's real settings they are ~8x the
            # RGB (25 MB a 1024x1024 image), so there the count comes from the processor's
            # formula and the worker prepares the item (README: engine workers).
            estimate = self.prompts.prepared_image_bytes(item.images)
            rgb = sum(3 * im.width * im.height for im in item.images)
            if estimate is not None and estimate > rgb:
                return self.prompts.count_prompt_tokens(item.messages, item.images)
            item.prepared = self.prompts.prepare(item.messages, item.images)
        return item.prepared.prompt_tokens

    def close(self) -> None:
        self.batcher.close()  # in-flight batches finish first
        for worker in self.workers:
            worker.close()

    def _submit(self, item: ChatItem, bulk: bool = False
                ) -> tuple[asyncio.Future[ChatResult], concurrent.futures.Future[ChatResult]]:
        try:
            (future,) = self.batcher.submit([item], self.timeout_s, bulk=bulk)
        except QueueFull as exc:
            raise queue_full(exc.retry_after_s) from exc
        except Closed as exc:
            raise shutting_down() from exc
        return asyncio.wrap_future(future), future

    async def complete(self, item: ChatItem, *, bulk: bool = False
                       ) -> tuple[ChatResult, Timing | None]:
        waiting, future = self._submit(item, bulk)
        try:
            return await waiting, timing_of(future)
        except asyncio.CancelledError:
            waiting.cancel()  # the client left: a queued item never reaches the device
            raise
        except Exception as exc:
            raise from_batch_failure(exc, self.timeout_s, "vision model") from exc

    async def stream(self, item: ChatItem, *, bulk: bool = False
                     ) -> AsyncGenerator[StreamEvent, None]:
        """Admit now (errors raise before any byte is sent), then yield text as it comes."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()

        def on_text(text: str) -> None:  # called on the device thread
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        gone = threading.Event()
        waiting, future = self._submit(replace(item, on_text=on_text, cancel=gone), bulk)
        return self._drain(waiting, future, pieces, gone)

    async def _drain(self, waiting: asyncio.Future[ChatResult],
                     future: concurrent.futures.Future[ChatResult], pieces: asyncio.Queue[str],
                     gone: threading.Event) -> AsyncGenerator[StreamEvent, None]:
        getter: asyncio.Future[str] | None = None
        try:
            while not waiting.done() or not pieces.empty():
                getter = asyncio.ensure_future(pieces.get())
                both: list[asyncio.Future[Any]] = [getter, waiting]
                await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield StreamEvent(text=getter.result())
                else:
                    getter.cancel()
            try:
                result = waiting.result()
            except Exception as exc:
                raise from_batch_failure(exc, self.timeout_s, "vision model") from exc
            yield StreamEvent(result=result, timing=timing_of(future))
        finally:
            if getter is not None:
                getter.cancel()  # a client that left mid-wait leaves no task pending
            waiting.cancel()  # no-op when done; drops the item if the client left early
            gone.set()  # and if it is already running, its row stops at the next token
