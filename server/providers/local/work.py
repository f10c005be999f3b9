"""What crosses to an engine worker and back, as primitives and bytes (no PIL objects, no
tensors), so the worker can be a thread, a child process, or later a replica on another
machine: an image to make and how to encode it; a conversation to answer, the text it
streams as it is produced, and a row to stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipelines.base import ImageItem, NotFinite, Picture, ShapeKey, VaeChoice
from pipelines.vlm import ChatItem, ChatResult, Prepared
from server.media.encode import encode_image


@dataclass(frozen=True)
class ImageWork:
    """One item for the batcher: the pipeline's item and the encoding its request asked
    for (batches mix requests, so each item carries its own)."""

    item: ImageItem
    fmt: str = "png"
    compression: int | None = None

    @property
    def shape_key(self) -> ShapeKey:
        return self.item.shape_key

    @property
    def pixels(self) -> int:
        return self.item.pixels


@dataclass(frozen=True)
class WireItem:
    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    strength: float
    fmt: str
    compression: int | None
    # img2img: the source as raw RGB bytes, already width x height (the intake fitted it)
    init_rgb: bytes | None = field(default=None, repr=False)
    vae: VaeChoice = "full"
    # inpainting: the mask as raw L bytes, width x height (255 = repaint)
    mask_l: bytes | None = field(default=None, repr=False)

    @staticmethod
    def of(work: ImageWork) -> WireItem:
        it = work.item
        init = it.init_image
        if init is not None and init.mode != "RGB":
            init = init.convert("RGB")
        return WireItem(it.prompt, it.seed, it.width, it.height, it.steps, it.guidance,
                        it.strength, work.fmt, work.compression,
                        None if init is None else init.tobytes(), it.vae,
                        None if it.mask is None else it.mask.convert("L").tobytes())

    def work(self) -> ImageWork:
        init = (None if self.init_rgb is None else
                Image.frombytes("RGB", (self.width, self.height), self.init_rgb))
        mask = (None if self.mask_l is None else
                Image.frombytes("L", (self.width, self.height), self.mask_l))
        return ImageWork(ImageItem(self.prompt, self.seed, self.width, self.height,
                                   self.steps, self.guidance, init, self.strength, self.vae,
                                   mask),
                         self.fmt, self.compression)


@dataclass(frozen=True)
class RunBatch:
    items: list[WireItem]


@dataclass(frozen=True)
class WireArray:
    """A numpy array as its bytes, dtype (with byte order, e.g. ``<f4``) and shape."""

    data: bytes = field(repr=False)
    dtype: str
    shape: tuple[int, ...]

    @staticmethod
    def of(array: np.ndarray) -> WireArray:
        return WireArray(np.ascontiguousarray(array).tobytes(), array.dtype.str,
                         tuple(array.shape))

    def array(self) -> np.ndarray:
        # A copy: writable, so torch takes it as it is.
        return np.frombuffer(self.data, np.dtype(self.dtype)).reshape(self.shape).copy()


@dataclass(frozen=True)
class WirePrepared:
    """A conversation's model inputs as admission prepared them (``pipelines.vlm.Prepared``)."""

    tokens: dict[str, WireArray]
    images: dict[str, WireArray]

    @staticmethod
    def of(prepared: Prepared) -> WirePrepared:
        return WirePrepared({k: WireArray.of(v) for k, v in prepared.tokens.items()},
                            {k: WireArray.of(v) for k, v in prepared.images.items()})

    def prepared(self) -> Prepared:
        return Prepared({k: v.array() for k, v in self.tokens.items()},
                        {k: v.array() for k, v in self.images.items()})


@dataclass(frozen=True)
class WireChat:
    """One conversation: its messages (JSON-able dicts, images as ``{"type": "image"}``
    parts), sampling, whether its text is wanted as it comes, and its images: either as
    admission prepared them (``prepared``: the worker only stacks them), or as raw RGB with
    their sizes (the intake decoded and fitted them; the worker prepares them), never both.

    Prepared images cross when they are no more bytes than the RGB: the pipe to the worker
    is crossed while the device waits, so it must not carry more than it did. The image
    processor's output can be far bigger than its input: for the real Qwen3-VL settings
    (16 px patches, temporal patch 2, float32) a 1024x1024 image is 25.2 MB of
    ``pixel_values`` against 3.1 MB of RGB, so those images cross as RGB; the tiny model's
    processor shrinks a 1024x1024 image to 64 patches, 0.4 MB, and those cross prepared.
    float16 would halve the prepared bytes but not keep the model's inputs exact (through
    float16, 16 of the 256 levels Qwen's normalization makes round to another bfloat16).
    """

    messages: list[dict[str, Any]]
    sizes: list[tuple[int, int]]
    images_rgb: list[bytes] = field(repr=False)
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    prepared: WirePrepared | None = field(default=None, repr=False)

    @staticmethod
    def of(item: ChatItem) -> WireChat:
        prepared = item.prepared
        rgb_bytes = sum(3 * im.width * im.height for im in item.images)
        if prepared is not None and prepared.image_bytes <= rgb_bytes:
            return WireChat(item.messages, [], [], item.max_tokens, item.temperature,
                            item.top_p, tuple(item.stop), item.seed, item.on_text is not None,
                            WirePrepared.of(prepared))
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in item.images]
        return WireChat(item.messages, [im.size for im in images],
                        [im.tobytes() for im in images], item.max_tokens, item.temperature,
                        item.top_p, tuple(item.stop), item.seed, item.on_text is not None)

    def item(self, on_text: Callable[[str], None] | None,
             cancel: threading.Event) -> ChatItem:
        images = [Image.frombytes("RGB", size, raw)
                  for size, raw in zip(self.sizes, self.images_rgb, strict=True)]
        return ChatItem(self.messages, images, self.max_tokens, self.temperature, self.top_p,
                        self.stop, self.seed, on_text if self.stream else None, cancel,
                        None if self.prepared is None else self.prepared.prepared())


@dataclass(frozen=True)
class RunChat:
    batch: int  # the parent's number for it: a late Cancel never reaches the next batch
    items: list[WireChat]


@dataclass(frozen=True)
class Text:
    """A streaming row's next piece of text, sent while its batch runs."""

    row: int
    piece: str


@dataclass(frozen=True)
class Cancel:
    """The row's client has gone: the worker stops that row at its next token."""

    batch: int
    row: int


@dataclass(frozen=True)
class Answered:
    results: list[ChatResult]  # a frozen dataclass of text and counts, one per row
    device_s: float


@dataclass(frozen=True)
class Ran:
    # encoded, one per item; an item whose pixels were not finite fails on its own
    images: list[bytes | NotFinite]
    device_s: float  # pipeline and encoding, as the worker timed them


@dataclass(frozen=True)
class Failed:
    message: str
    fatal: bool = False  # the worker exits after this (a poisoned CUDA context)


@dataclass(frozen=True)
class Loaded:
    description: str  # device, dtype, attention


@dataclass(frozen=True)
class Stop:
    pass


Message = RunBatch | RunChat | Cancel | Ran | Answered | Text | Failed | Loaded | Stop


Generate = Callable[[list[ImageItem]], list[Picture | NotFinite]]


def encode_all(pictures: list[Picture | NotFinite], works: list[ImageWork]
               ) -> list[bytes | NotFinite]:
    """uint8 arrays from the device to the bytes each item's request asked for; an item
    that failed stays its error (the batcher fails that item alone)."""
    return [p if isinstance(p, NotFinite) else
            encode_image(Image.fromarray(p), w.fmt, w.compression)
            for p, w in zip(pictures, works, strict=True)]


def pipeline_runner(generate: Generate) -> Callable[[list[ImageWork]], list[bytes | NotFinite]]:
    """A pipeline's ``generate(items) -> pictures`` as a batcher's ``run(works) -> bytes``."""

    def run_works(works: list[ImageWork]) -> list[bytes | NotFinite]:
        return encode_all(generate([w.item for w in works]), works)

    return run_works
