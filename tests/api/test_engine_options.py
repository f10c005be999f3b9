"""The engine's options as a client and an operator see them: `vae: "tiny"` and the fast
qualities, a decoder that is not installed refused by name, a compiled server that is
ready only once its buckets are warm, and an image that is not finite failing alone."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pipelines.base import ImageItem, NotFinite, Picture
from pipelines.registry import MODEL_ID, TAESDXL, WeightsInfo
from server.app import create_app
from server.config import BatchSettings, EngineSettings, ImageSettings, Settings
from server.errors import APIError
from server.job import ImageJob
from server.providers.local.batcher import BatchPolicy
from server.providers.local.images import LocalImages
from tests.conftest import serve

SMALL = ImageSettings(min_side=64, fast_qualities=["low"])


def pixels(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def client(tiny_weights: Path) -> Iterator[openai.OpenAI]:
    settings = Settings(weights_dir=tiny_weights, images=SMALL,
                        batch=BatchSettings(warmup=False))
    with serve(create_app(settings)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def make(client: openai.OpenAI, **extra: object) -> np.ndarray:
    quality = extra.pop("quality", "auto")
    r = client.images.generate(prompt="a lighthouse", size="64x64", response_format="b64_json",
                               quality=quality,  # type: ignore[arg-type]
                               extra_body={"seed": 11, "steps": 1, **extra})
    return pixels(r.data[0].b64_json if r.data else None)


def test_the_tiny_vae_is_asked_for_by_field_or_by_quality(client: openai.OpenAI) -> None:
    full, tiny = make(client), make(client, vae="tiny")
    assert np.abs(full - tiny).mean() > 5  # another decoder, another picture
    assert np.array_equal(make(client, vae="full"), full)
    # `low` is a fast quality here: the tiny VAE, unless the request says otherwise
    assert np.array_equal(make(client, quality="low"), tiny)
    assert np.array_equal(make(client, quality="low", vae="full"), full)


def test_an_unknown_vae_is_a_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        make(client, vae="taesd")
    assert err.value.status_code == 400 and "vae" in str(err.value.body)


def test_a_tiny_vae_that_is_not_installed_is_refused_by_name(tiny_weights: Path,
                                                               tmp_path: Path) -> None:
    for folder in tiny_weights.iterdir():
        if folder.name != TAESDXL.folders["tiny"]:
            shutil.copytree(folder, tmp_path / folder.name)
    settings = Settings(weights_dir=tmp_path, images=SMALL, batch=BatchSettings(warmup=False))
    with serve(create_app(settings)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            make(c, vae="tiny")
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == "vae"
        assert "spillway weights fetch taesdxl" in body["message"]
        make(c, quality="low")  # a fast quality falls back to the full VAE quietly


def test_a_compiled_server_is_ready_with_its_buckets_warm(tiny_weights: Path) -> None:
    """The `eager` backend: dynamo's capture and guards, without a C++ compiler or minutes
    of codegen (inductor: tests/unit/pipelines/test_compiled.py; aot_eager trips over a
    non-contiguous group norm in torch 2.13's CPU decomposition of the VAE)."""
    settings = Settings(weights_dir=tiny_weights, images=SMALL,
                        batch=BatchSettings(warmup=False),
                        engine=EngineSettings(devices="inprocess", compile=True,
                                              compile_backend="eager",
                                              warm_buckets=["64x64@1"]))
    with serve(create_app(settings)) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer x"}).json()
        engine = next(m for m in models["data"] if m["id"] == MODEL_ID)["spillway"]["engine"]
        assert "compiled 1 buckets" in engine and "vae full+tiny" in engine


def test_a_bad_warm_bucket_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="bucket '512'"):
        EngineSettings(warm_buckets=["512"])


def test_an_image_that_is_not_finite_fails_its_request_alone() -> None:
    """Two requests in one batch; one item decodes to NaN: that request gets a 500 in
    shape, the other its pictures."""

    def generate(items: list[ImageItem]) -> list[Picture | NotFinite]:
        return [NotFinite("item decoded to NaN or infinite pixels") if "nan" in i.prompt
                else np.zeros((i.height, i.width, 3), np.uint8) for i in items]

    local = LocalImages(MODEL_ID, WeightsInfo(MODEL_ID, "tiny", Path("unused")), generate,
                        BatchPolicy(max_batch=8, max_wait_s=0.2), 30.0)
    local.start()

    def job(prompt: str) -> ImageJob:
        return ImageJob(MODEL_ID, prompt, [1, 2], 64, 64, 1)

    async def both() -> list[object]:
        return await asyncio.gather(local.generate(job("a nan")), local.generate(job("fine")),
                                    return_exceptions=True)

    try:
        bad, good = asyncio.run(both())
    finally:
        local.close()
    assert isinstance(bad, APIError) and bad.status == 500 and bad.code == "pipeline_error"
    assert "NaN" in bad.message
    assert not isinstance(good, BaseException) and len(good.images) == 2  # type: ignore[attr-defined]
    assert local.batcher.snapshot().items_done == 4  # one batch of both requests


def test_a_compiling_worker_gets_time_to_compile_and_serves(tiny_weights: Path) -> None:
    """An engine worker process compiles at load; its load deadline grows by
    compile_timeout_s per bucket and decoder, so a slow compile is not taken for a hung
    load (and restarted, and compiled again...)."""
    engine = EngineSettings(devices="cpu", compile=True, compile_backend="eager",
                            warm_buckets=["64x64@1"], load_timeout_s=120,
                            compile_timeout_s=30)
    settings = Settings(weights_dir=tiny_weights, images=SMALL,
                        batch=BatchSettings(warmup=False), engine=engine)
    app = create_app(settings, chat_loader=None)
    with serve(app) as url:
        local = app.state.spillway.images
        assert local is not None
        (worker,) = local.workers
        assert worker.load_timeout_s == 120 + 30 * 1 * 2  # one bucket, full and tiny VAE
        assert "compiled 1 buckets" in worker.description
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert make(c).shape == (64, 64, 3) and make(c, vae="tiny").shape == (64, 64, 3)
    assert EngineSettings(load_timeout_s=600).load_deadline_s(decoders=2) == 600
