"""Weights: the full-size random build is the real SDXL architecture; fetch fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipelines.registry import (
    FOLDERS,
    SDXL_VAE_FP16,
    TAESDXL,
    FetchError,
    best_weights,
    decoders_for,
    ensure_default,
    fetch,
    spec_for,
)
from pipelines.sdxl_random import (
    TEXT_ENCODER_CONFIGS,
    UNET_CONFIGS,
    VAE_CONFIGS,
    _text_config,
    build_tokenizer,
)
from tests.conftest import free_port


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_build_has_sdxl_parameter_counts() -> None:
    """Built on the meta device (no memory): the counts of stabilityai/sdxl-turbo's parts."""
    tok = build_tokenizer()
    te1, te2 = TEXT_ENCODER_CONFIGS["full"]
    with torch.device("meta"):
        assert params(UNet2DConditionModel(**UNET_CONFIGS["full"])) == 2_567_463_684
        assert params(AutoencoderKL(**VAE_CONFIGS["full"])) == 83_653_863
        assert params(CLIPTextModel(_text_config(tok, te1))) == 123_060_480
        assert params(CLIPTextModelWithProjection(_text_config(tok, te2))) == 694_659_840


def test_tokenizer_is_byte_level_with_clip_specials() -> None:
    tok = build_tokenizer()
    ids = tok("a red bicycle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(tok) == 514 and tok.model_max_length == 77
    assert len(tok("é" * 500, truncation=True)["input_ids"]) == 77


def test_fetch_without_a_hub_fails_in_one_sentence(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(FetchError) as exc:
        fetch("sdxl-turbo", tmp_path, endpoint=closed)
    message = str(exc.value)
    assert message.startswith("could not download stabilityai/sdxl-turbo")
    assert "\n" not in message and str(tmp_path / FOLDERS["hub"]) in message
    assert best_weights(tmp_path) is None  # nothing half-downloaded is served
    with pytest.raises(FetchError, match="unknown model"):
        fetch("sdxl-lightning", tmp_path)


def test_ensure_default_builds_tiny_once(tmp_path: Path) -> None:
    first = ensure_default(tmp_path)
    assert [(w.model_id, w.source) for w in first] == [("sdxl-turbo", "tiny"),
                                                       ("local-vlm", "tiny"),
                                                       ("taesdxl", "tiny")]
    stamps = [(w.path / "spillway.json").stat().st_mtime_ns for w in first]
    again = ensure_default(tmp_path)
    assert [w.path for w in again] == [w.path for w in first]
    assert [(w.path / "spillway.json").stat().st_mtime_ns for w in again] == stamps
    assert not list(tmp_path.glob("*.partial"))


def test_real_weights_are_preferred_over_tiny(tmp_path: Path, tiny_weights: Path) -> None:
    import shutil

    shutil.copytree(tiny_weights / FOLDERS["tiny"], tmp_path / FOLDERS["tiny"])
    shutil.copytree(tiny_weights / FOLDERS["tiny"], tmp_path / FOLDERS["hub"])
    (tmp_path / FOLDERS["hub"] / "spillway.json").unlink()  # as a hand-copied folder
    found = best_weights(tmp_path)
    assert found is not None and found.source == "hub" and found.path.name == "sdxl-turbo"


def test_a_folder_named_in_settings_is_described_by_its_marker(tiny_weights: Path,
                                                               tmp_path: Path) -> None:
    from pipelines.registry import describe

    assert describe(tiny_weights / FOLDERS["tiny"]).source == "tiny"
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        describe(tmp_path)


def test_random_full_path_saves_an_fp16_variant_that_loads(tmp_path: Path) -> None:
    """The path `spillway weights random-full` takes, with the tiny configs."""
    from pipelines.base import ImageItem
    from pipelines.registry import build_random_full
    from pipelines.sdxl_turbo import Limits, SDXLTurbo

    info = build_random_full(tmp_path, device="cpu", size="tiny")
    assert info.source == "random-full" and info.variant == "fp16"
    assert (info.path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    found = best_weights(tmp_path)
    assert found is not None and found.variant == "fp16"
    engine = SDXLTurbo.load(found.path, torch.device("cpu"), variant=found.variant,
                            limits=Limits(min_side=64))
    assert engine.pipe.unet.dtype == torch.float32  # fp32 on the CPU, whatever was saved
    assert engine.text2img([ImageItem("x", 1, 64, 64, 1)])[0].size == (64, 64)
    # the tiny decoder comes with it, for `vae: "tiny"` in benchmarks
    tiny = best_weights(tmp_path, TAESDXL)
    assert tiny is not None and tiny.source == "random-full"


def test_real_weights_get_only_a_real_tiny_vae(tmp_path: Path, tiny_weights: Path) -> None:
    """A random decoder would turn real latents into noise: with real SDXL weights only
    a fetched TAESDXL is served; random SDXL weights take the built-in one."""
    import shutil

    shutil.copytree(tiny_weights / FOLDERS["tiny"], tmp_path / FOLDERS["hub"])
    (tmp_path / FOLDERS["hub"] / "spillway.json").unlink()
    shutil.copytree(tiny_weights / TAESDXL.folders["tiny"], tmp_path / TAESDXL.folders["tiny"])
    real = best_weights(tmp_path)
    assert real is not None and real.source == "hub"
    assert decoders_for(real, tmp_path) == (None, None)
    random = best_weights(tiny_weights)
    assert random is not None
    tiny, fix = decoders_for(random, tiny_weights)
    assert tiny is not None and tiny.source == "tiny" and fix is None
    shutil.copytree(tiny_weights / TAESDXL.folders["tiny"], tmp_path / TAESDXL.folders["hub"])
    (tmp_path / TAESDXL.folders["hub"] / "spillway.json").unlink()
    tiny, _ = decoders_for(real, tmp_path)
    assert tiny is not None and tiny.source == "hub"


def test_fetching_sdxl_turbo_fetches_the_fp16_fix_vae_too() -> None:
    assert spec_for("sdxl-turbo").extras == (SDXL_VAE_FP16.model_id,)
    assert spec_for("sdxl-vae-fp16-fix").hub_repo == "madebyollin/sdxl-vae-fp16-fix"
    assert spec_for("taesdxl").hub_repo == "madebyollin/taesdxl"


def test_the_full_tiny_vae_is_taesdxls_architecture() -> None:
    """diffusers' AutoencoderTiny defaults are TAESD's; 4 latent channels, 8x upsampling."""
    from pipelines.sdxl_random import build_tiny_vae

    with torch.device("meta"):
        vae = build_tiny_vae("full")
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 1.0
    assert vae.config.decoder_block_out_channels == (64, 64, 64, 64)
    small = build_tiny_vae("tiny")
    assert small.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 64, 64)
