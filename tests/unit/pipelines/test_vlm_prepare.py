"""Items prepared before their batch (images through the image processor, prompts
tokenized with placeholders expanded): the batch then only pads and stacks them into
exactly the inputs the processor makes for the whole batch, and the device thread runs no
image processing. Prepared items cross to an engine worker when that is no more bytes."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from pipelines.vlm import ChatItem, Prompts, VisionLanguageModel
from server.providers.local.work import WireChat

SIZES = [[], [(40, 30)], [(300, 200), (64, 640)]]  # rows with 0, 1 and 2 images


def picture(size: tuple[int, int], shade: int) -> Image.Image:
    image = Image.new("RGB", size, (shade, 200 - shade // 2, 90))
    image.paste((255 - shade, 20, 40), (0, 0, size[0] // 2, size[1] // 3))
    return image


def rows(max_tokens: int = 12) -> list[ChatItem]:
    items = []
    for i, sizes in enumerate(SIZES):
        images = [picture(s, 40 * (i + j)) for j, s in enumerate(sizes)]
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"row {i}"}]
        items.append(ChatItem(messages=[{"role": "user", "content": parts}], images=images,
                              max_tokens=max_tokens, temperature=0))
    return items


def prepared(prompts: Prompts, items: list[ChatItem]) -> list[ChatItem]:
    for item in items:
        item.prepared = prompts.prepare(item.messages, item.images)
    return items


def whole_batch_inputs(vlm: VisionLanguageModel, items: list[ChatItem]) -> dict[str, Any]:
    """What generate gave the model before: the processor over the whole batch."""
    return dict(vlm.processor(text=[vlm.render(i.messages) for i in items],
                              images=[im for i in items for im in i.images],
                              return_tensors="pt", padding=True))


def test_stacked_rows_are_the_inputs_the_processor_makes_for_the_batch(
        vlm: VisionLanguageModel) -> None:
    items = rows()
    ready = [vlm.prompts.prepare(i.messages, i.images) for i in items]
    expected = whole_batch_inputs(vlm, items)
    got = vlm.batch_inputs(ready)
    assert set(got) == set(expected) >= {"input_ids", "attention_mask", "pixel_values",
                                         "image_grid_thw", "mm_token_type_ids"}
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    # Rows of different lengths: the short ones were padded on the left.
    assert len({p.prompt_tokens for p in ready}) == 3
    assert got["attention_mask"][0, 0] == 0 and got["attention_mask"][:, -1].all()


def test_prepared_rows_answer_as_the_whole_batch_processor_did(
        vlm: VisionLanguageModel) -> None:
    items = prepared(vlm.prompts, rows(max_tokens=12))
    inputs = whole_batch_inputs(vlm, items)
    out = vlm.model.generate(**inputs, max_new_tokens=12, do_sample=False, top_k=None,
                             temperature=None, top_p=None, pad_token_id=vlm.pad_id)
    before = []
    for new in out[:, inputs["input_ids"].shape[1]:].tolist():
        ended = [n for n, t in enumerate(new) if t in vlm.eos]
        before.append(vlm.tokenizer.decode(new[:ended[0] if ended else None],
                                           skip_special_tokens=True))
    results = vlm.generate(items)
    assert [r.text for r in results] == before
    assert [r.prompt_tokens for r in results] == inputs["attention_mask"].sum(1).tolist()
    assert vlm.generate(rows(max_tokens=12)) == results  # prepared on the spot: the same


def count_calls(target: Any, name: str) -> list[int]:
    """Wrap one object's method (an instance attribute: nothing else sees it)."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(target, name)

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(threading.get_ident())
        return original(*args, **kw)

    setattr(target, name, counted)
    return calls


def test_generate_of_prepared_items_runs_no_image_processing(folder: Path) -> None:
    model = VisionLanguageModel.load(folder, torch.device("cpu"))  # this test's own
    items = prepared(model.prompts, rows(max_tokens=3))
    calls = count_calls(model.processor.image_processor, "preprocess")
    model.generate(items)
    assert calls == []
    model.generate(rows(max_tokens=3))  # the same hook sees an unprepared batch's images
    assert len(calls) == 2


@pytest.mark.parametrize("sizes", SIZES + [[(1024, 1024)], [(1, 1), (1200, 900)]])
def test_prepared_prompt_tokens_are_the_counted_ones(
        vlm: VisionLanguageModel, sizes: list[tuple[int, int]]) -> None:
    images = [picture(s, 90) for s in sizes]
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images]
                 + [{"type": "text", "text": "What is in these?"}]}]
    prompts = vlm.prompts
    counted = prompts.count_prompt_tokens(messages, images)
    assert prompts.prepare(messages, images).prompt_tokens == counted
    # A processor without the per-size formula: the count comes from preparing.
    assert Prompts(NoFormula(vlm.processor), vlm.model.config).count_prompt_tokens(
        messages, images) == counted


class NoFormula:
    """A processor that cannot tell an image's token count from its size."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __getattr__(self, name: str) -> Any:
        if name == "_get_num_multimodal_tokens":
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __call__(self, **kw: Any) -> Any:
        return self.processor(**kw)


def test_a_prepared_item_crosses_without_its_rgb_when_that_is_smaller(
        vlm: VisionLanguageModel) -> None:
    big = ChatItem([{"role": "user", "content": [{"type": "image"}]}],
                   [picture((1024, 1024), 30)], max_tokens=5, temperature=0,
                   on_text=lambda _: None)
    big.prepared = vlm.prompts.prepare(big.messages, big.images)
    assert big.prepared.image_bytes < 1024 * 1024 * 3 // 4  # the tiny model shrinks it
    wire = pickle.loads(pickle.dumps(WireChat.of(big)))
    assert wire.images_rgb == [] and wire.sizes == [] and wire.prepared is not None
    back = wire.item(print, threading.Event())
    assert back.images == [] and back.prepared is not None and back.on_text is print
    for mine, theirs in [(big.prepared.tokens, back.prepared.tokens),
                         (big.prepared.images, back.prepared.images)]:
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype and (mine[key] == theirs[key]).all()
            assert theirs[key].flags.writeable
    assert vlm.generate([back]) == vlm.generate([big])
    # A small image makes more patch bytes than it has RGB: the RGB crosses, not both.
    small = prepared(vlm.prompts, rows())[1]
    assert small.prepared is not None and small.prepared.image_bytes > 40 * 30 * 3
    wire = pickle.loads(pickle.dumps(WireChat.of(small)))
    assert wire.prepared is None and wire.sizes == [(40, 30)]
    assert wire.item(None, threading.Event()).prepared is None
    # Text alone crosses prepared.
    text = prepared(vlm.prompts, rows())[0]
    assert WireChat.of(text).prepared is not None


def test_admission_prepares_only_what_is_no_bigger_than_its_pictures(
        vlm: VisionLanguageModel) -> None:
    """Prepared arrays wait in the queue and cross the pipe: a small picture (whose patches
    outweigh its pixels, as every picture does at Qwen3-VL's real settings) is counted by
    the processor's formula and left for the worker to prepare."""
    from pipelines.registry import WeightsInfo
    from server.providers.local.batcher import BatchPolicy
    from server.providers.local.chat import LocalChat

    local = LocalChat("local-vlm", WeightsInfo("local-vlm", "tiny", Path("unused")),
                      vlm.generate, vlm.prompts, BatchPolicy(), 30.0)

    def item(size: tuple[int, int]) -> ChatItem:
        parts = [{"type": "image"}, {"type": "text", "text": "what is this?"}]
        return ChatItem(messages=[{"role": "user", "content": parts}],
                        images=[picture(size, 80)])

    small, large = item((300, 200)), item((1024, 1024))
    estimate = vlm.prompts.prepared_image_bytes(small.images)
    assert estimate is not None and estimate > 300 * 200 * 3
    assert local.count_tokens(small) == vlm.prompts.prepare(small.messages,
                                                            small.images).prompt_tokens
    assert small.prepared is None
    count = local.count_tokens(large)
    assert large.prepared is not None and count == large.prepared.prompt_tokens
    assert large.prepared.images["pixel_values"].nbytes == vlm.prompts.prepared_image_bytes(
        large.images)
