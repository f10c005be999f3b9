"""The local image model: a pipeline on the device behind its batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from pipelines.base import ImageItem
from pipelines.registry import WeightsInfo
from server.errors import queue_full, shutting_down
from server.job import ImageJob, OutImage
from server.media.encode import MEDIA_TYPES, encode_image
from server.providers.local.batcher import (
    Batcher,
    BatchPolicy,
    Closed,
    QueueFull,
    from_batch_failure,
    timing_of,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LocalRun:
    images: list[OutImage]
    queue_s: float  # the longest any of the job's items waited
    device_s: float  # the job's share of device time


class LocalImages:
    """Runs image jobs on the local pipeline; one batcher, one device thread."""

    def __init__(self, model_id: str, weights: WeightsInfo,
                 text2img: Callable[[list[ImageItem]], list[Image.Image]],
                 policy: BatchPolicy, timeout_s: float, description: str = "") -> None:
        self.model_id = model_id
        self.weights = weights
        self.description = description
        self.timeout_s = timeout_s
        self.batcher: Batcher[ImageItem, Image.Image] = Batcher(model_id, text2img, policy)

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()

    async def generate(self, job: ImageJob, *, bulk: bool = False) -> LocalRun:
        try:
            futures = self.batcher.submit(job.items(), self.timeout_s, bulk=bulk)
        except QueueFull as exc:
            raise queue_full(exc.retry_after_s) from exc
        except Closed as exc:
            raise shutting_down() from exc
        waits = [asyncio.wrap_future(f) for f in futures]
        try:
            images = await asyncio.gather(*waits)
        except asyncio.CancelledError:
            for f in futures:  # the client left: queued items never reach the device
                f.cancel()
            raise
        except Exception as exc:
            raise from_batch_failure(exc, self.timeout_s, "image pipeline") from exc
        media_type = MEDIA_TYPES[job.output_format]
        encoded = await asyncio.to_thread(
            lambda: [encode_image(im, job.output_format, job.output_compression) for im in images])
        timings = [t for t in map(timing_of, futures) if t is not None]
        return LocalRun([OutImage(data, media_type, seed)
                         for data, seed in zip(encoded, job.seeds, strict=True)],
                        max((t.queue_s for t in timings), default=0.0),
                        sum(t.device_s for t in timings))
