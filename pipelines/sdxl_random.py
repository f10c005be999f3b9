"""SDXL pipelines with random weights, built from configs in code (no download).

Two sizes:
- ``tiny``: the embedded default. Same diffusers/transformers classes as SDXL-Turbo,
  VAE scale factor 8, a locally built byte-level tokenizer; a 512x512 image takes a
  fraction of a second on a laptop CPU. The pictures are noise.
- ``full``: the real SDXL-Turbo architecture (UNet 2.6B, two CLIP text encoders,
  the SDXL VAE) with random weights, so a GPU benchmark measures true speed
  without the real weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Size = Literal["tiny", "full"]

# SDXL-Turbo's scheduler: Euler ancestral with trailing timesteps, guidance-free.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}

_UNET_COMMON: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
}

UNET_CONFIGS: dict[Size, dict[str, Any]] = {
    "tiny": {
        **_UNET_COMMON,
        "sample_size": 64,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "transformer_layers_per_block": (1, 1),
        "norm_num_groups": 8,
        "cross_attention_dim": 64,  # text encoder 1 (32) + text encoder 2 (32)
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    },
    "full": {
        **_UNET_COMMON,
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "norm_num_groups": 32,
        "cross_attention_dim": 2048,  # 768 + 1280
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 6 * 256 + 1280,
    },
}

_VAE_COMMON: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.13025,
}

VAE_CONFIGS: dict[Size, dict[str, Any]] = {
    # Four blocks keep vae_scale_factor == 8: with two, a 512x512 latent is 256x256.
    "tiny": {**_VAE_COMMON, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1,
             "norm_num_groups": 8, "sample_size": 64},
    "full": {**_VAE_COMMON, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
             "norm_num_groups": 32, "sample_size": 512, "force_upcast": True},
}

TEXT_ENCODER_CONFIGS: dict[Size, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
         "num_hidden_layers": 2, "projection_dim": 32, "hidden_act": "gelu"},
        {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
         "num_hidden_layers": 2, "projection_dim": 32, "hidden_act": "gelu"},
    ),
    "full": (
        # CLIP ViT-L/14 text tower
        {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
         "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
         "vocab_size": 49408},
        # OpenCLIP ViT-bigG/14 text tower
        {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
         "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
         "vocab_size": 49408},
    ),
}

MAX_PROMPT_TOKENS = 77


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every byte is a token (514 in all)."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for sym in symbols:
        vocab[sym] = len(vocab)
    for sym in symbols:
        vocab[sym + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_PROMPT_TOKENS)


def _text_config(tokenizer: CLIPTokenizer, overrides: dict[str, Any]) -> CLIPTextConfig:
    fields = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": MAX_PROMPT_TOKENS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return CLIPTextConfig(**fields)


def build_sdxl(size: Size, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> StableDiffusionXLPipeline:
    """Build an SDXL pipeline of the given size with seeded random weights."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    te1_overrides, te2_overrides = TEXT_ENCODER_CONFIGS[size]
    with torch.device(device):
        text_encoder = CLIPTextModel(_text_config(tokenizer, te1_overrides))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, te2_overrides))
        unet = UNet2DConditionModel(**UNET_CONFIGS[size])
        vae = AutoencoderKL(**VAE_CONFIGS[size])
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# TAESDXL's architecture (diffusers' AutoencoderTiny defaults) and a tiny one like it: four
# blocks, so the latent is 1/8 of the picture as with the full VAE.
TINY_VAE_CONFIGS: dict[Size, dict[str, Any]] = {
    "tiny": {"encoder_block_out_channels": (8, 8, 8, 8),
             "decoder_block_out_channels": (8, 8, 8, 8),
             "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1)},
    "full": {},
}


def build_tiny_vae(size: Size, seed: int = 0) -> AutoencoderTiny:
    """A random-weight TAESDXL-class decoder (``vae: "tiny"``) of the given size."""
    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=4, **TINY_VAE_CONFIGS[size])
