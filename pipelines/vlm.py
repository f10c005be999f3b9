"""A vision-language model from a local folder: batched ``generate`` with per-row limits,
stop strings and streaming."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteriaList,
)
from transformers.utils import is_torchvision_available

from pipelines.vlm_rows import Row, RowStops

log = logging.getLogger(__name__)

Message = dict[str, Any]  # {"role": ..., "content": str | [{"type": "text"|"image", ...}]}


@dataclass(frozen=True, eq=False)
class Prepared:
    """One conversation as its batch takes it, made once by ``Prompts.prepare`` (the server
    does it at admission, on its own thread, so the device thread only pads and stacks).

    ``tokens``: what the processor makes per prompt token, one unpadded row each
    (``input_ids`` with every image placeholder expanded, ``attention_mask``, and e.g.
    Qwen's ``mm_token_type_ids``). ``images``: what its image processor makes of the
    conversation's images, in order (Qwen: ``pixel_values``, one row per patch, and
    ``image_grid_thw``, one row per image); empty without images.
    """

    tokens: dict[str, np.ndarray]
    images: dict[str, np.ndarray]

    @property
    def prompt_tokens(self) -> int:
        return int(self.tokens["input_ids"].shape[0])

    @property
    def image_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.images.values())


@dataclass(eq=False)
class ChatItem:
    """One conversation to answer. Images appear in ``messages`` as ``{"type": "image"}``
    parts and in ``images`` in the same order. ``prepared``: the model's inputs for it,
    when admission made them (``generate`` prepares an item that comes without)."""

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Streaming: called from the device thread with each new piece of text.
    on_text: Callable[[str], None] | None = None
    # Set when the client has gone: the row stops at its next token, freeing the batch.
    cancel: threading.Event | None = None
    prepared: Prepared | None = field(default=None, repr=False)

    @property
    def shape_key(self) -> tuple[str, float, float, int | None]:
        """Rows of one generate call share sampling settings (and a seed, if any)."""
        return ("chat", self.temperature, self.top_p, self.seed)

    @property
    def pixels(self) -> int:
        return sum(im.width * im.height for im in self.images)


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Scale down (never up) to at most ``max_pixels``, keeping the aspect ratio."""
    if image.width * image.height <= max_pixels:
        return image
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def ensure_qwen3vl_processor() -> None:
    """Let ``AutoProcessor`` build a Qwen3-VL processor on a machine without torchvision.

    In transformers 5 a Qwen3-VL processor has a video processor, and both its lookup paths
    sit behind torchvision: the ``VideoProcessorMixin`` name the processor checks its parts
    against is only exported by ``transformers`` with torchvision installed, and the
    ``AutoVideoProcessor`` mapping for Qwen3-VL is only filled then. CPU machines have no
    usable torchvision (FACTS.md), yet the images and text here never touch video. So this
    puts the name on the module object ``processing_utils`` resolves names from, and
    registers the video processor class (importable without torchvision; only processing
    a video would need it). Idempotent; a no-op where transformers sees torchvision (the
    GPU boxes), since it has done both itself there.
    """
    if is_torchvision_available():
        return
    from transformers import Qwen3VLConfig, processing_utils
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    module = processing_utils.transformers_module  # not the `transformers` object itself
    if not hasattr(module, "VideoProcessorMixin"):
        module.VideoProcessorMixin = VideoProcessorMixin
    AutoVideoProcessor.register(Qwen3VLConfig, Qwen3VLVideoProcessor, exist_ok=True)


def pick_vlm_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Prompts:
    """A VLM folder's processor side: chat template, tokenizer, image placeholders and the
    context length. No weights and no torch model: the server counts prompt tokens with
    it before admission while the model itself runs in an engine worker."""

    def __init__(self, processor: Any, config: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation appends on the right
        cfg = getattr(config, "text_config", config)
        self.context_length = int(getattr(cfg, "max_position_embeddings", 4096))

    @classmethod
    def load(cls, folder: str | Path) -> Prompts:
        ensure_qwen3vl_processor()
        return cls(AutoProcessor.from_pretrained(str(folder), local_files_only=True),
                   AutoConfig.from_pretrained(str(folder), local_files_only=True))

    def render(self, messages: list[Message]) -> str:
        text: str = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
        return text

    def prepare(self, messages: list[Message], images: list[Image.Image]) -> Prepared:
        """This conversation's share of a batch's inputs: the processor over its prompt and
        its images alone. The batch's ``processor(text=..., images=..., padding=True)``
        makes the same rows (it processes images one by one and tokenizes each prompt on
        its own), left-padded and concatenated: ``VisionLanguageModel`` does only that."""
        out = self.processor(text=[self.render(messages)], images=images or None,
                             return_tensors="np")
        image_keys = set(getattr(self.processor.image_processor, "model_input_names", ()))
        tokens = {k: np.asarray(v) for k, v in out.items() if k not in image_keys}
        width = tokens["input_ids"].shape
        for key, value in tokens.items():
            if value.shape != width or value.shape[0] != 1:
                raise ValueError(f"the processor's {key!r} has shape {value.shape}, not one "
                                 f"value per prompt token {width}")
        return Prepared({k: v[0] for k, v in tokens.items()},
                        {k: np.asarray(v) for k, v in out.items() if k in image_keys})

    def prepared_image_bytes(self, images: list[Image.Image]) -> int | None:
        """What ``prepare`` would hold for these images (pixel_values, float32), from the
        processor's own patch count, without preparing them; None where it has no formula.
        Qwen's patches repeat in time: at its real settings this is ~8x the raw RGB."""
        if not images:
            return 0
        try:
            data = self.processor._get_num_multimodal_tokens(
                image_sizes=[[im.height, im.width] for im in images])
            patches = int(sum(data.num_image_patches))
        except (AttributeError, TypeError, NotImplementedError):
            return None
        ip = self.processor.image_processor
        channels = len(getattr(ip, "image_mean", None) or (0, 0, 0))
        per_patch = channels * int(getattr(ip, "temporal_patch_size", None) or 1) * \
            int(getattr(ip, "patch_size", None) or 1) ** 2
        return patches * per_patch * 4

    def count_prompt_tokens(self, messages: list[Message], images: list[Image.Image]) -> int:
        """Prompt length after image placeholders expand, without running the vision tower
        (nor, where the processor has a formula, the image processor)."""
        text = self.render(messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not images:
            return len(ids)
        sizes = [[im.height, im.width] for im in images]
        try:
            per_image = self.processor._get_num_multimodal_tokens(image_sizes=sizes)
            counts = list(per_image.num_image_tokens)
        except (AttributeError, TypeError, NotImplementedError):
            counts = []
        if len(counts) != len(images):  # no cheap formula: let the processor expand it
            return self.prepare(messages, images).prompt_tokens
        return len(ids) - len(images) + int(sum(counts))


class VisionLanguageModel:
    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model
        self.prompts = Prompts(processor, model.config)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.context_length = self.prompts.context_length
        eos = model.generation_config.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos))

    @classmethod
    def load(cls, folder: str | Path, device: torch.device) -> VisionLanguageModel:
        ensure_qwen3vl_processor()
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(
            str(folder), dtype=pick_vlm_dtype(device), use_safetensors=True,
            local_files_only=True)
        model.to(device).eval()
        return cls(model, processor, device)

    def render(self, messages: list[Message]) -> str:
        return self.prompts.render(messages)

    def count_prompt_tokens(self, messages: list[Message], images: list[Image.Image]) -> int:
        return self.prompts.count_prompt_tokens(messages, images)

    @torch.inference_mode()
    def generate(self, items: list[ChatItem]) -> list[ChatResult]:
        if not items:
            return []
        first = items[0]
        if any(item.shape_key != first.shape_key for item in items):
            raise ValueError("generate batch mixes sampling settings")
        # 1. Each row as admission prepared it (one nobody prepared is prepared now), then
        #    only padded and stacked: no image processing here.
        prepared = [item.prepared if item.prepared is not None
                    else self.prompts.prepare(item.messages, item.images) for item in items]
        inputs = self.batch_inputs(prepared)
        prompt_len = int(inputs["input_ids"].shape[1])
        prompt_tokens = [p.prompt_tokens for p in prepared]
        # 2. Per-row limits, stop strings and streaming ride on a stopping criterion.
        rows = [Row(item, self.tokenizer, self.eos) for item in items]
        sample = first.temperature > 0
        if first.seed is not None:
            torch.manual_seed(first.seed)
        self.model.generate(
            **inputs,
            max_new_tokens=max(item.max_tokens for item in items),
            do_sample=sample,
            temperature=first.temperature if sample else None,
            top_p=first.top_p if sample else None,
            top_k=None,
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([RowStops(rows, prompt_len)]),
        )
        # 3. Rows the loop ended without a verdict ran out of max_new_tokens.
        results = []
        for row, n_prompt in zip(rows, prompt_tokens, strict=True):
            finish = row.finish or row.end("length")
            results.append(ChatResult(row.text, finish, n_prompt, len(row.ids)))
        return results

    def batch_inputs(self, prepared: list[Prepared]) -> dict[str, torch.Tensor]:
        """The batch's model inputs on the device, as the processor makes them for the whole
        batch with ``padding=True``: token rows left-padded to the longest (input ids with
        the pad token, masks and type ids with 0), image arrays concatenated in row order,
        ``pixel_values`` in the model's dtype."""
        keys = prepared[0].tokens.keys()
        if any(p.tokens.keys() != keys for p in prepared):
            raise ValueError(f"prepared rows differ in their inputs: "
                             f"{sorted({tuple(sorted(p.tokens)) for p in prepared})}")
        width = max(p.prompt_tokens for p in prepared)
        inputs: dict[str, torch.Tensor] = {}
        for key in keys:
            rows = np.full((len(prepared), width), self.pad_id if key == "input_ids" else 0,
                           dtype=prepared[0].tokens[key].dtype)
            for i, p in enumerate(prepared):
                rows[i, width - p.prompt_tokens:] = p.tokens[key]
            inputs[key] = torch.from_numpy(rows).to(self.device)
        with_images = [p.images for p in prepared if p.images]
        for key in sorted({key for images in with_images for key in images}):
            # Each row's part to the device on its own: no host copy of the whole batch.
            parts = [torch.from_numpy(images[key]).to(self.device) for images in with_images]
            inputs[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs
