"""Images, as both the HTTP routes and the Batch API run them: the request checked and
turned into a job (edit sources taken in through the one intake path), then routed, run
and accounted for."""

from __future__ import annotations

import functools
from dataclasses import replace

from PIL import Image

from server import catalog
from server.config import Settings
from server.errors import bad_request
from server.job import ImageJob, OutImage, Served
from server.media import intake
from server.media.budget import PixelBudget
from server.routing.dispatch import BeforeSend, Dispatcher
from server.serving.accounting import Account, Accounting, served_by
from server.wire.openai_images import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
    edit_size,
    fit_source,
    parse_size,
    repaint_mask,
    to_edit_job,
    to_image_job,
)

Source = tuple[bytes | str, str]  # upload bytes or a URL, and the param it came in


def check_edit(req: ImageEditRequest, settings: Settings) -> None:
    """An edit's cheap checks, before any image is fetched or decoded."""
    catalog.check_image_model(req.model, settings.clouds)
    # The job with the source's size left open: every other field checked now.
    to_image_job(req.model_copy(update={"size": "auto"}), req.model or "auto",
                 settings.images)
    if req.size not in (None, "", "auto"):
        parse_size(req.size, settings.images)


class ImageServing:
    def __init__(self, settings: Settings, dispatcher: Dispatcher, accounting: Accounting,
                 pixels: PixelBudget | None) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.accounting = accounting
        self.pixels = pixels

    def generation_job(self, req: ImageGenerationRequest, model: str | None = None
                       ) -> ImageJob:
        catalog.check_image_model(model if model is not None else req.model,
                                    self.settings.clouds)
        return to_image_job(req, model or req.model or "auto", self.settings.images)

    async def edit_job(self, req: ImageEditRequest, sources: list[Source],
                       model: str | None = None, mask: Source | None = None) -> ImageJob:
        catalog.check_image_model(model if model is not None else req.model,
                                    self.settings.clouds)
        images, raw = await self.edit_sources(req, sources)
        repaint = None if mask is None else await self.edit_mask(mask, raw, images[0].size)
        return to_edit_job(req, model or req.model or "auto", self.settings.images, images,
                           repaint)

    async def edit_mask(self, mask: Source, source_size: tuple[int, int],
                        size: tuple[int, int]) -> Image.Image:
        """The mask of an inpainting edit: the first source's size (as OpenAI requires),
        its transparent pixels as what to repaint, fitted as the sources were."""
        data, param = mask

        def fit(im: Image.Image) -> Image.Image:
            if im.size != source_size:
                raise bad_request(f"The mask is {im.size[0]}x{im.size[1]} and the image "
                                  f"{source_size[0]}x{source_size[1]}; they must be the same "
                                  "size.", param="mask")
            return repaint_mask(im, size)

        media = self.settings.media
        if isinstance(data, bytes):
            return await intake.decode_image(data, media, param=param, budget=self.pixels,
                                             fit=fit, mode="RGBA")
        return await intake.load_image(data, media, param=param, budget=self.pixels, fit=fit,
                                       mode="RGBA")

    async def variation_job(self, req: ImageVariationRequest, source: Source) -> ImageJob:
        """A variation: image-to-image of ``source`` with an empty prompt, on the local
        model (no cloud makes variations of the same kind)."""
        if req.model not in catalog.IMAGE_NAMES:
            raise bad_request(f"Variations are made by the local model ({catalog.IMAGE_MODEL}); "
                              f"{req.model!r} does not make them here.", param="model",
                              code="unsupported_value")
        job = await self.edit_job(req.as_edit(self.settings.images), [source],
                                  catalog.IMAGE_MODEL)
        return replace(job, prompt="")

    async def edit_sources(self, req: ImageEditRequest, sources: list[Source]
                           ) -> tuple[list[Image.Image], tuple[int, int]]:
        """The images of an edit: decoded and fitted to the output size in one worker-
        thread step, within the pixel budget, and the first one's size as it came. Unless
        ``size`` names the output size, the first image's shape decides it, so that one
        goes first."""
        limits, media = self.settings.images, self.settings.media
        raw: list[tuple[int, int]] = []

        def first_fit(size: tuple[int, int] | None) -> intake.Fit:
            def fit(im: Image.Image) -> Image.Image:
                raw.append(im.size)
                return fit_source(im, size or edit_size(req.size, im.size, limits))
            return fit

        async def load(source: bytes | str, param: str, fit: intake.Fit) -> Image.Image:
            if isinstance(source, bytes):
                return await intake.decode_image(source, media, param=param,
                                                 budget=self.pixels, fit=fit)
            return await intake.load_image(source, media, param=param, budget=self.pixels,
                                           fit=fit)

        (source, param), rest = sources[0], sources[1:]
        if req.size in (None, "", "auto"):
            first = await load(source, param, first_fit(None))
            fit = functools.partial(fit_source, size=first.size)
            images = [first, *await intake.load_all(load(src, p, fit) for src, p in rest)]
        else:
            size = parse_size(req.size, limits)  # before any decoding: a bad size is cheap
            fit = functools.partial(fit_source, size=size)
            images = await intake.load_all([load(source, param, first_fit(size)),
                                            *(load(src, p, fit) for src, p in rest)])
        return images, raw[0]

    async def run(self, account: Account, job: ImageJob, deadline_s: float, *,
                  before_send: BeforeSend | None = None) -> tuple[list[OutImage], Served]:
        """Reserve the quota, route and run; the account learns what ran where, or how it
        failed (its owner closes it)."""
        account.images = job.n
        deadline_s = await self.accounting.reserve_by(account, self.dispatcher.cost_ceiling(job),
                                                      deadline_s)
        return await served_by(account, self.dispatcher.images(
            job, deadline_s, bulk=account.bulk, before_send=before_send, tiers=account.tiers))
