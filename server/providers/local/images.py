"""The local image model: a pipeline on the device behind its batcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pipelines.base import ImageItem, NotFinite, VaeChoice
from pipelines.registry import WeightsInfo
from server.errors import bad_request, queue_full, shutting_down
from server.job import ImageJob, OutImage
from server.media.encode import MEDIA_TYPES
from server.providers.local.batcher import (
    Batcher,
    BatchPolicy,
    Closed,
    QueueFull,
    from_batch_failure,
    timing_of,
)
from server.providers.local.engine import EngineProcess
from server.providers.local.work import Generate, ImageWork, pipeline_runner

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LocalRun:
    images: list[OutImage]
    queue_s: float  # the longest any of the job's items waited
    device_s: float  # the job's share of device time
    done_s: float = 0.0  # from admission until the batcher had the job's last image


class LocalImages:
    """Runs image jobs on the local pipeline behind one batcher: ``text2img`` in this
    process (on the batcher's thread), or ``workers``, engine worker processes, one
    batcher thread each. Either way the images come back encoded."""

    def __init__(self, model_id: str, weights: WeightsInfo, generate: Generate | None,
                 policy: BatchPolicy, timeout_s: float, description: str = "", *,
                 workers: Sequence[EngineProcess] = (), vaes: Sequence[VaeChoice] = ("full",),
                 fast_qualities: Sequence[str] = ()) -> None:
        self.model_id = model_id
        self.weights = weights
        self.description = description
        self.timeout_s = timeout_s
        self.workers = list(workers)
        self.vaes = tuple(vaes)  # the decoders loaded beside the model
        self.fast_qualities = frozenset(fast_qualities)
        self.batcher: Batcher[ImageWork, bytes | NotFinite] = Batcher(
            model_id, None if generate is None else pipeline_runner(generate), policy,
            runners=self.workers)

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()  # in-flight batches finish first
        for worker in self.workers:
            worker.close()

    def warm_up(self, width: int, height: int, steps: int) -> None:
        """Run a batch of 1 and one of 4 with each decoder (blocking): the device does its
        first-call work, and the estimates start from measured costs at two batch sizes,
        not the prior."""
        for vae in self.vaes:
            for n in (1, 4):
                futures = self.batcher.submit(
                    [ImageWork(ImageItem("warm-up", seed, width, height, steps, vae=vae))
                     for seed in range(n)], self.timeout_s, bulk=True)
                for f in futures:
                    f.result(self.timeout_s)

    def vae_for(self, job: ImageJob) -> VaeChoice:
        """The decoder a job runs with: as asked, else the tiny one for a fast quality
        when it is loaded, else the model's own. Asked for and not loaded: a 400."""
        if job.vae is not None:
            if job.vae not in self.vaes:
                raise bad_request(f"vae {job.vae!r} is not installed on this server (run "
                                  "`spillway weights fetch taesdxl`); omit 'vae' or use "
                                  "'full'.", param="vae", code="unsupported_value")
            return job.vae
        return "tiny" if job.quality in self.fast_qualities and "tiny" in self.vaes else "full"

    async def generate(self, job: ImageJob, *, bulk: bool = False,
                       due_in_s: float | None = None) -> LocalRun:
        """``due_in_s``: when the client needs the images (see ``Batcher.submit``)."""
        vae = self.vae_for(job)
        try:
            futures = self.batcher.submit(
                [ImageWork(item, job.output_format, job.output_compression)
                 for item in job.items(vae)], self.timeout_s, bulk=bulk, due_in_s=due_in_s)
        except QueueFull as exc:
            raise queue_full(exc.retry_after_s) from exc
        except Closed as exc:
            raise shutting_down() from exc
        waits = [asyncio.wrap_future(f) for f in futures]
        try:
            encoded = await asyncio.gather(*waits)
        except asyncio.CancelledError:
            for f in futures:  # the client left: queued items never reach the device
                f.cancel()
            raise
        except Exception as exc:
            raise from_batch_failure(exc, self.timeout_s, "image pipeline") from exc
        media_type = MEDIA_TYPES[job.output_format]
        timings = [t for t in map(timing_of, futures) if t is not None]
        # An item that failed (NotFinite) raised above: what is left is bytes.
        return LocalRun([OutImage(data, media_type, seed)
                         for data, seed in zip(encoded, job.seeds, strict=True)
                         if isinstance(data, bytes)],
                        max((t.queue_s for t in timings), default=0.0),
                        sum(t.device_s for t in timings),
                        max((t.queue_s + t.device_s * t.batch_size for t in timings),
                            default=0.0))
