"""A tiny random-weight vision-language model: the embedded default for image chat.

The same classes as the real default (Qwen3-VL): ``Qwen3VLForConditionalGeneration`` and a
``Qwen3VLProcessor`` with the PIL image processor and a byte-level BPE ``Qwen2Tokenizer``
trained here with the ``tokenizers`` library, so the code paths the real model takes
(placeholder expansion, multimodal rotary positions, deepstack vision features) run on a
CPU in milliseconds. It has ~255k parameters and random weights: its answers are noise.
"""

from __future__ import annotations

import json

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from pipelines.vlm import ensure_qwen3vl_processor

# Qwen's own special tokens, so prompts render exactly as the real model's do.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MERGES = 160  # learned merges on top of the 256 bytes: multi-byte tokens, some mid-character
PATCH, MERGE = 16, 2  # one image token covers a 32x32 pixel square
# A few to two dozen image tokens whatever the input size: the processor scales every
# image (a 1 MP upload too) to between 4 and 24 token squares, keeping its aspect ratio.
MIN_PIXELS, MAX_PIXELS = 4 * (PATCH * MERGE) ** 2, 24 * (PATCH * MERGE) ** 2

# ChatML; an image part becomes the placeholder the processor expands to the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the merges are learned from: English, accents, CJK and emoji, so that some learned
# tokens hold only part of a character's UTF-8 bytes (streaming must wait for the rest).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is in this image? Describe it.",
    "A photo of a cat sitting on a red chair next to the window, in the afternoon light.",
    "Café crème, naïve façade, déjà vu: the résumé of a señor from São Paulo.",
    "这是一张图片。图片里有一只猫和一把红色的椅子。请描述这张图片。",
    "写真に猫が写っています。赤い椅子の上に座っています。",
    "Weather: ☀️ 🌧️ ⛄ — smiles 😀😃😄😁 and hearts ❤️🧡💛💚💙💜.",
]


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges learned on CORPUS, split into words the way Qwen2Tokenizer splits."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + MERGES,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    # The serialized model is the one stable way to read merges back (pairs in 0.23).
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return bpe.get_vocab(), [(a, b) for a, b in merges]


def build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE (any byte sequence can be formed) with Qwen's specials and template."""
    vocab, merges = _train_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=SPECIALS, padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """The real model's shape in miniature; every special id is the tokenizer's own."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        # As many KV heads as heads: grouped-query attention sends torch's CPU SDPA down a
        # slow path here (~1 ms a call at 400 tokens, 100x plain attention; generation
        # went from ~3 ms to ~25 ms a token). The GPU runs the real model's GQA.
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        max_position_embeddings=2048,  # room for a prompt and a ~1,900-token answer
        # Multimodal rotary: (time, height, width) sections summing to head_dim / 2.
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=64,
        num_position_embeddings=64,  # a perfect square: an 8x8 grid, interpolated
        deepstack_visual_indexes=[0])  # below the vision depth, at most the text layers
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         **ids)


def build_tiny_vlm(seed: int = 0) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    ensure_qwen3vl_processor()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    pixels = dict(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                  patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE,
                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # The processor requires a video part; built without torchvision, it is never called.
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels),
                                 video_processor=Qwen3VLVideoProcessor(**pixels),
                                 tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    model = Qwen3VLForConditionalGeneration(build_config(tokenizer)).eval()
    # As the real model's generation_config: <|im_end|> ends a turn, <|endoftext|> ends a
    # document (eos too), pads, and stands in for the bos the tokenizer does not have.
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_text]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = end_of_text
    return model, processor
