"""The built-in tiny VLM: Qwen3-VL classes, built, saved and loaded the way the server
loads real weights, answering batches row for row as it answers each row alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipelines.registry import VLM, ensure_default
from pipelines.vlm import ChatItem, ChatResult, Prompts, VisionLanguageModel


def picture(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1], 40), (0, 0, size[0] // 2, size[1] // 3))
    return image


def ask(text: str, images: list[Image.Image], **kw: Any) -> ChatItem:
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return ChatItem(messages=[{"role": "user", "content": parts}], images=images, **kw)


def test_the_tiny_vlm_has_the_real_defaults_classes(folder: Path, vlm: VisionLanguageModel
                                                    ) -> None:
    assert type(vlm.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(vlm.processor).__name__ == "Qwen3VLProcessor"
    assert type(vlm.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert sum(p.numel() for p in vlm.model.parameters()) < 400_000
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert json.loads((folder / "spillway.json").read_text())["source"] == "tiny"
    tok, config = vlm.tokenizer, vlm.model.config
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == (
        "<|im_end|>", "<|endoftext|>", "left")
    for name, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"),
                        ("vision_end_token_id", "<|vision_end|>")]:
        assert getattr(config, name) == tok.convert_tokens_to_ids(token)
    assert vlm.model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.eos_token_id in vlm.eos
    assert vlm.context_length == 2048


def test_the_template_renders_chatml_with_one_placeholder_per_image(
        vlm: VisionLanguageModel) -> None:
    rendered = vlm.render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"},
                                     {"type": "image"}, {"type": "text", "text": "B"}]}])
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                        f"<|im_start|>user\nA{image}{image}B<|im_end|>\n"
                        "<|im_start|>assistant\n")


@pytest.mark.parametrize("sizes", [[], [(40, 30)], [(300, 200), (64, 640)],
                                   [(1000, 1000), (1, 1)], [(1200, 900)]])
def test_counted_prompt_tokens_are_what_the_processor_makes(
        folder: Path, sizes: list[tuple[int, int]]) -> None:
    prompts = Prompts.load(folder)  # the server's side: no model
    item = ask("What is in these?", [picture(s, (10, 200, 90)) for s in sizes])
    expanded = prompts.processor(text=[prompts.render(item.messages)],
                                 images=item.images or None)["input_ids"][0]
    assert prompts.count_prompt_tokens(item.messages, item.images) == len(expanded)
    # A megapixel upload still costs the tiny model a couple of dozen tokens at most.
    text_only = len(prompts.tokenizer(prompts.render(item.messages))["input_ids"])
    assert len(expanded) - text_only <= 24 * len(sizes)


def test_a_batch_answers_each_row_as_it_would_alone(vlm: VisionLanguageModel) -> None:
    rows = [ask("What is this?", [picture((40, 30), (200, 30, 90))], max_tokens=12,
                temperature=0),
            ChatItem(messages=[{"role": "user", "content": "Describe the sea"}], max_tokens=20,
                     temperature=0),
            ask("Compare them", [picture((900, 700), (0, 90, 200)),
                                 picture((64, 300), (250, 250, 0))], max_tokens=16,
                temperature=0)]
    together = vlm.generate(rows)
    alone = [vlm.generate([row])[0] for row in rows]
    assert together == alone
    assert [r.completion_tokens for r in together] == [12, 20, 16]  # random weights: no eos
    assert all(r.text for r in together)
    assert together[0].prompt_tokens != together[2].prompt_tokens


def first_answer(vlm: VisionLanguageModel, **kw: Any) -> ChatResult:
    item = ChatItem(messages=[{"role": "user", "content": "Tell me a story"}], temperature=0,
                    **kw)
    return vlm.generate([item])[0]


def test_streamed_pieces_add_up_to_the_answer(vlm: VisionLanguageModel) -> None:
    pieces: list[str] = []
    result = first_answer(vlm, max_tokens=40, on_text=pieces.append)
    assert len(pieces) > 5 and "".join(pieces) == result.text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # never half a character


def test_max_tokens_and_stop_strings_end_answers(vlm: VisionLanguageModel) -> None:
    full = first_answer(vlm, max_tokens=40)
    short = first_answer(vlm, max_tokens=5)
    assert (short.finish_reason, short.completion_tokens) == ("length", 5)
    assert full.text.startswith(short.text)
    stop = full.text[len(full.text) // 2:][:2]  # somewhere in the second half
    cut = full.text.find(stop)
    pieces: list[str] = []
    stopped = first_answer(vlm, max_tokens=40, stop=(stop,), on_text=pieces.append)
    assert (stopped.text, stopped.finish_reason) == (full.text[:cut], "stop")
    assert "".join(pieces) == stopped.text
    assert stopped.completion_tokens < full.completion_tokens


def test_an_old_llava_tiny_build_is_rebuilt_and_real_weights_are_not(
        tmp_path: Path, tiny_weights: Path) -> None:
    for name in ("sdxl-turbo-tiny", "taesdxl-tiny"):  # present: not rebuilt here
        if (tiny_weights / name).exists():
            (tmp_path / name).symlink_to(tiny_weights / name)
    old = tmp_path / VLM.folders["tiny"]
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (old / "spillway.json").write_text(json.dumps({"model": VLM.model_id, "source": "tiny"}))
    (vlm_info,) = [w for w in ensure_default(tmp_path) if w.model_id == VLM.model_id]
    assert vlm_info.path == old
    assert json.loads((old / "config.json").read_text())["model_type"] == "qwen3_vl"
    # Real weights of any class are served as they are.
    shutil.copytree(old, tmp_path / VLM.folders["hub"])
    hub = tmp_path / VLM.folders["hub"]
    (hub / "spillway.json").unlink()
    (hub / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (vlm_info,) = [w for w in ensure_default(tmp_path) if w.model_id == VLM.model_id]
    assert vlm_info.source == "hub"
    assert json.loads((hub / "config.json").read_text())["model_type"] == "llava"
