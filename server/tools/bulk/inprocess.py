"""In-process: the local engine loaded once, pending outputs grouped by (width, height,
steps) into batched pipeline calls, each batch encoded and saved on a thread while the
next one computes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pipelines.registry import MODEL_ID
from server.config import Settings
from server.providers.pricing import local_cost
from server.tools.bulk.folder import Sink
from server.tools.bulk.rows import BulkError, Output

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.sdxl_turbo import SDXLTurbo


def _batches(pending: list[Output], batch_size: int) -> Iterator[list[Output]]:
    groups: dict[tuple[int | None, int | None, int | None], list[Output]] = {}
    for out in pending:
        groups.setdefault((out.row.width, out.row.height, out.row.steps), []).append(out)
    for outs in groups.values():
        for i in range(0, len(outs), batch_size):
            yield outs[i:i + batch_size]


class _Writer:
    """Encodes and saves finished batches on a thread while the next batch computes."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.error: BaseException | None = None
        self.queue: queue.Queue[tuple[list[Output], list[Image.Image], float] | None] = \
            queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._work, name="bulk-writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        from server.media.encode import encode_image

        prices = self.sink.prices
        while (job := self.queue.get()) is not None:
            outs, images, seconds = job
            if self.error is not None:
                continue
            try:
                for out, image in zip(outs, images, strict=True):
                    data = encode_image(image, out.row.fmt, None)
                    self.sink.save(out, data, route="local", model=MODEL_ID,
                                   cost_usd=local_cost(prices, seconds / len(outs)),
                                   latency_ms=seconds * 1000, width=image.width,
                                   height=image.height, seed=out.seed)
            except BaseException as exc:  # handed to the main thread
                self.error = exc

    def put(self, outs: list[Output], images: list[Image.Image], seconds: float) -> None:
        self.check()
        self.queue.put((outs, images, seconds))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Let the queued batches be written; a second Ctrl-C abandons them."""
        self.queue.put(None)
        while self.thread.is_alive():
            self.thread.join(0.1)
        self.check()


def _generate(engine: SDXLTurbo, chunk: list[Output], sink: Sink
              ) -> tuple[list[Output], list[Image.Image]]:
    """One batched call; if it fails, each item alone, so one bad item costs only itself."""
    from pipelines.base import ImageItem

    def item(out: Output) -> ImageItem:
        row = out.row
        assert row.width is not None and row.height is not None and row.steps is not None
        return ImageItem(row.prompt, out.seed, row.width, row.height, row.steps)

    try:
        return chunk, engine.text2img([item(out) for out in chunk])
    except Exception as exc:
        if len(chunk) == 1:
            sink.fail(chunk, f"image {chunk[0].index}: generation failed: {exc}")
            return [], []
    made: list[Output] = []
    images: list[Image.Image] = []
    for out in chunk:
        try:
            images.extend(engine.text2img([item(out)]))
            made.append(out)
        except Exception as exc:
            sink.fail([out], f"image {out.index}: generation failed: {exc}")
    return made, images


def run_local(pending: list[Output], settings: Settings, batch_size: int,
               sink: Sink) -> None:
    from server.providers.local.loading import load_engine

    try:
        engine, _ = load_engine(settings)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise BulkError(str(exc)) from exc
    sink.reporter.restart()
    writer = _Writer(sink)
    interrupted = False
    try:
        for chunk in _batches(pending, batch_size):
            writer.check()
            started = time.perf_counter()
            made, images = _generate(engine, chunk, sink)
            if made:
                writer.put(made, images, time.perf_counter() - started)
    except KeyboardInterrupt:
        interrupted = True
    writer.close()  # the batches already made are written
    if interrupted:
        raise KeyboardInterrupt
