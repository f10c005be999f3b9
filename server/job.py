"""The work units: what every endpoint turns its wire request into (``ImageJob``,
``ChatJob``), what a provider gives back (``OutImage``, ``ImageOutcome``, ``ChatOutcome``)
and where it ran (``Served``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from pipelines.base import ImageItem, VaeChoice
from pipelines.vlm import ChatItem, ChatResult


@dataclass(frozen=True)
class ImageJob:
    model: str
    prompt: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    quality: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    user: str | None = None
    # images/edits: source pictures, already width x height; output i edits source i % len
    init_images: list[Image.Image] = field(default_factory=list, repr=False)
    strength: float = 0.0
    # the decoder the request asked for (extension field `vae`); None: by quality
    # (images.fast_qualities), where the image is made locally
    vae: VaeChoice | None = None
    # images/edits with a mask: what to repaint (mode "L", width x height, 255 = repaint;
    # OpenAI's transparent pixels), the same for every source
    mask: Image.Image | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def items(self, vae: VaeChoice = "full") -> list[ImageItem]:
        sources = self.init_images
        return [ImageItem(self.prompt, seed, self.width, self.height, self.steps,
                          init_image=sources[i % len(sources)] if sources else None,
                          strength=self.strength if sources else 0.0, vae=vae,
                          mask=self.mask if sources else None)
                for i, seed in enumerate(self.seeds)]


@dataclass
class Served:
    """What the response headers and the ledger say about where a job ran."""

    route: str
    reason: str
    cost_usd: float = 0.0
    cloud_equivalent_usd: float = 0.0
    queue_ms: float = 0.0
    device_s: float = 0.0
    upstream_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"x-spillway-route": self.route,
                "x-spillway-cost-usd": f"{self.cost_usd:.6f}",
                "x-spillway-queue-ms": str(round(self.queue_ms))}


@dataclass(eq=False)
class ChatJob(ChatItem):
    """A vision chat after intake: the pipeline's ``ChatItem`` (messages in HF form,
    images as {"type": "image"} parts, the decoded images in order, sampling) and the
    model it asked for. A local batch runs it as it is."""

    model: str = "auto"


@dataclass(frozen=True)
class ChatOutcome(ChatResult):
    """A chat answer (the pipeline's ``ChatResult``) and who gave it at what cost."""

    model: str = ""
    cost_usd: float = 0.0
    request_id: str | None = None

    @staticmethod
    def of(result: ChatResult, model: str, cost_usd: float = 0.0) -> ChatOutcome:
        return ChatOutcome(result.text, result.finish_reason, result.prompt_tokens,
                           result.completion_tokens, model, cost_usd)


@dataclass(frozen=True)
class OutImage:
    data: bytes  # encoded in the job's output_format, at the job's width x height
    media_type: str
    seed: int | None = None


@dataclass(frozen=True)
class ImageOutcome:
    images: list[OutImage]
    model: str  # the upstream model that answered
    cost_usd: float
    request_id: str | None = None
