"""The images API over real loopback HTTP, driven by the official openai SDK, tiny model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server.app import create_app
from tests.conftest import serve


@pytest.fixture(scope="module")
def base_url(tiny_weights) -> Iterator[str]:  # type: ignore[no-untyped-def]
    from server.config import BatchSettings, Settings

    settings = Settings(weights_dir=tiny_weights, max_body_mb=1,
                        batch=BatchSettings(max_wait_ms=50, warmup=False))
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_four_512_pngs(client: openai.OpenAI) -> None:
    r = client.images.generate(model="sdxl-turbo", prompt="a red bicycle", size="512x512", n=4,
                               response_format="b64_json")
    assert len(r.data) == 4
    for d in r.data:
        assert d.b64_json
        raw = base64.b64decode(d.b64_json)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(raw)).size == (512, 512)
    # without a seed each image draws its own, and they differ
    seeds = [d.model_extra["seed"] for d in r.data]
    assert len(set(seeds)) == 4


def test_seed_echoed_and_deterministic(client: openai.OpenAI) -> None:
    kw = dict(prompt="a lighthouse", size="256x256", response_format="b64_json")
    a = client.images.generate(n=2, extra_body={"seed": 7}, **kw)
    assert [d.model_extra["seed"] for d in a.data] == [7, 8]
    # the same request again (same batch shape on an idle server): identical pixels
    b = client.images.generate(n=2, extra_body={"seed": 7}, **kw)
    assert np.array_equal(pixels(a.data[0].b64_json), pixels(b.data[0].b64_json))
    assert np.array_equal(pixels(a.data[1].b64_json), pixels(b.data[1].b64_json))
    # seed 8 alone matches the second image of the seed-7 request (seeds s, s+1, ...),
    # to within one level of 255 (see test_pipeline.py for why not bit for bit)
    c = client.images.generate(n=1, extra_body={"seed": 8}, **kw)
    assert np.abs(pixels(a.data[1].b64_json).astype(int) - pixels(c.data[0].b64_json)).max() <= 1
    # another seed, another picture
    assert np.abs(pixels(a.data[0].b64_json).astype(int) - pixels(c.data[0].b64_json)).mean() > 5


def test_sizes_and_formats(base_url: str, client: openai.OpenAI) -> None:
    r = client.images.generate(prompt="x", size="512x256", response_format="b64_json",
                               output_format="jpeg")
    raw = base64.b64decode(r.data[0].b64_json)
    assert raw[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(raw)).size == (512, 256)
    r = client.images.generate(prompt="x", size="auto", output_format="webp")
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert (im.format, im.size) == ("WEBP", (512, 512))
    assert r.size == "512x512"


def test_url_response_serves_the_image(client: openai.OpenAI) -> None:
    r = client.images.generate(prompt="x", size="256x256", n=2, response_format="url",
                               extra_body={"seed": 3})
    urls = [d.url for d in r.data]
    assert all(u and "/v1/images/img_" in u for u in urls)
    got = httpx.get(urls[0])
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    b = client.images.generate(prompt="x", size="256x256", n=2, response_format="b64_json",
                               extra_body={"seed": 3})
    assert got.content == base64.b64decode(b.data[0].b64_json)
    missing = httpx.get(urls[0].rsplit("/", 1)[0] + "/img_doesnotexist")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "image_not_found"


def test_headers_say_where_it_ran(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/images/generations",
                   json={"prompt": "x", "size": "256x256"}, headers={"x-request-id": "abc-1"})
    assert r.status_code == 200
    assert r.headers["x-spillway-route"] == "local"
    assert r.headers["x-request-id"] == "abc-1"


def test_models_says_which_weights(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["sdxl-turbo", "local-vlm"]
    for model in models:
        info = model.model_extra["spillway"]
        assert info["source"] == "tiny"
        assert "random weights" in info["weights"]


def test_health_and_ready(base_url: str) -> None:
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/readyz").json()["status"] == "ready"


def _assert_openai_error(body: object) -> dict[str, object]:
    assert isinstance(body, dict) and set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


BAD_BODIES = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "x" * 32001}, 400, "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "size": "8192x8192"}, 400, "size"),
    ({"prompt": "x", "size": "abc"}, 400, "size"),
    ({"prompt": "x", "size": "500x500"}, 400, "size"),
    ({"prompt": "x", "size": "128x128"}, 400, "size"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ({"prompt": "x", "response_format": "gif"}, 400, "response_format"),
    ({"prompt": "x", "steps": 9}, 400, "steps"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"n": 1}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_input_gets_openai_shaped_4xx(base_url: str, body: dict[str, object], status: int,
                                          param: str) -> None:
    r = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert _assert_openai_error(r.json())["param"] == param


def test_bad_input_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", n=11)
    assert exc.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="stable-diffusion-9")
    # a cloud model on a server without that cloud's key: a clear 400, not a 500
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", model="gpt-image-1")
    assert exc.value.body["code"] == "provider_not_configured"  # type: ignore[index]


def test_malformed_json(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/images/generations", content=b'{"prompt": "x",',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    _assert_openai_error(r.json())
    r = httpx.post(f"{base_url}/v1/images/generations", content=b"[1, 2]",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_body_over_the_limit(base_url: str) -> None:
    big = b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}'
    r = httpx.post(f"{base_url}/v1/images/generations", content=big,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert _assert_openai_error(r.json())["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it streams
        yield b'{"prompt": "'
        for _ in range(3):
            yield b"a" * 2**20
        yield b'"}'

    r = httpx.post(f"{base_url}/v1/images/generations", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    _assert_openai_error(r.json())


def test_unknown_route_and_method(base_url: str) -> None:
    r = httpx.get(f"{base_url}/v1/nothing-here")
    assert r.status_code == 404
    _assert_openai_error(r.json())
    r = httpx.delete(f"{base_url}/v1/models")
    assert r.status_code == 405
    _assert_openai_error(r.json())
