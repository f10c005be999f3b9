"""A vision-language model from a local folder: batched ``generate`` with per-row limits,
stop strings and streaming."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

log = logging.getLogger(__name__)

Message = dict[str, Any]  # {"role": ..., "content": str | [{"type": "text"|"image", ...}]}


@dataclass(eq=False)
class ChatItem:
    """One conversation to answer. Images appear in ``messages`` as ``{"type": "image"}``
    parts and in ``images`` in the same order."""

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


def pick_vlm_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _Row:
    """Decoding state of one row: its tokens, its text, what it has streamed."""

    def __init__(self, item: ChatItem, tokenizer: Any, eos: set[int]) -> None:
        self.item = item
        self.tokenizer = tokenizer
        self.eos = eos
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in item.stop), default=1) - 1

    def push(self, token: int) -> None:
        if self.finish is not None:
            return
        if self.item.cancel is not None and self.item.cancel.is_set():
            self.finish = "stop"
            return
        if token in self.eos:
            self.finish = "stop"
        else:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in self.item.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.ids) >= self.item.max_tokens:
                self.finish = "length"
        self._stream()

    def _stream(self) -> None:
        if self.item.on_text is None:
            return
        end = len(self.text)
        if self.finish is None:
            end -= self.hold  # a stop string may still be forming
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1  # half a UTF-8 character: wait for the rest
        if end > self.sent:
            self.item.on_text(self.text[self.sent:end])
            self.sent = end


class _RowStops(StoppingCriteria):  # type: ignore[misc]
    """Feeds each new token to its row and stops rows at their own limits."""

    def __init__(self, rows: list[_Row], prompt_len: int) -> None:
        self.rows = rows
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_len:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                row.push(token)
        done = [row.finish is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


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
        return cls(AutoProcessor.from_pretrained(str(folder), local_files_only=True),
                   AutoConfig.from_pretrained(str(folder), local_files_only=True))

    def render(self, messages: list[Message]) -> str:
        text: str = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
        return text

    def count_prompt_tokens(self, messages: list[Message], images: list[Image.Image]) -> int:
        """Prompt length after image placeholders expand, without running the vision tower."""
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
            out = self.processor(text=[text], images=images, return_tensors="np")
            return int(out["input_ids"].shape[1])
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
        # 1. One prompt per row; images flattened in row order, as the processor expects.
        texts = [self.render(item.messages) for item in items]
        images = [im for item in items for im in item.images]
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt",
                                padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_len = int(inputs["input_ids"].shape[1])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        # 2. Per-row limits, stop strings and streaming ride on a stopping criterion.
        rows = [_Row(item, self.tokenizer, self.eos) for item in items]
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
            stopping_criteria=StoppingCriteriaList([_RowStops(rows, prompt_len)]),
        )
        # 3. Rows the loop ended without a verdict ran out of max_new_tokens.
        results = []
        for row, n_prompt in zip(rows, prompt_tokens, strict=True):
            if row.finish is None:
                row.finish = "length"
                row._stream()
            results.append(ChatResult(row.text, row.finish, int(n_prompt), len(row.ids)))
        return results
