"""/v1/images/edits: SDXL-Turbo image-to-image, multipart and JSON, via the openai SDK."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server.app import create_app
from server.config import Settings
from tests.conftest import serve


def png(color: tuple[int, int, int], size: tuple[int, int] = (256, 256)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def pixels(b64: str | None) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64 or ""))).convert("RGB")
                      ).astype(int)


RED, BLUE = png((230, 20, 20)), png((20, 20, 230))


@pytest.fixture(scope="module")
def base_url(tiny_weights: Path) -> Iterator[str]:
    with serve(create_app(Settings(weights_dir=tiny_weights), chat_loader=None)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def edit(client: openai.OpenAI, image: object, seed: int, strength: float | None = None,
         **kw: object):  # type: ignore[no-untyped-def]
    extra = {"seed": seed} if strength is None else {"seed": seed, "strength": strength}
    return client.images.edit(image=image, prompt="make it a watercolor",  # type: ignore[arg-type]
                              response_format="b64_json", extra_body=extra, **kw)


def test_one_image(client: openai.OpenAI) -> None:
    r = edit(client, ("red.png", RED, "image/png"), 5, n=2, size="256x256")
    assert [d.model_extra["seed"] for d in r.data] == [5, 6]
    first = pixels(r.data[0].b64_json)
    assert first.shape == (256, 256, 3)
    assert np.abs(first - pixels(r.data[1].b64_json)).mean() > 1  # seeds differ
    # the source matters: same seed, another picture in, another picture out (the tiny
    # random VAE keeps little of its input, so "another" is small here, yet far over 1)
    other = edit(client, ("blue.png", BLUE, "image/png"), 5, n=2, size="256x256")
    assert np.abs(first - pixels(other.data[0].b64_json)).max() > 4
    # and the same request again gives the same pixels
    again = edit(client, ("red.png", RED, "image/png"), 5, n=2, size="256x256")
    assert np.array_equal(first, pixels(again.data[0].b64_json))


def test_several_images_edit_in_turn(client: openai.OpenAI) -> None:
    """Repeated image[] parts: output i edits source i (cycling when n is larger)."""
    both = edit(client, [("a.png", RED, "image/png"), ("b.png", BLUE, "image/png")], 9, n=2,
                size="256x256")
    out0, out1 = pixels(both.data[0].b64_json), pixels(both.data[1].b64_json)
    red9 = pixels(edit(client, ("a.png", RED, "image/png"), 9, size="256x256").data[0].b64_json)
    blue9 = pixels(edit(client, ("b.png", BLUE, "image/png"), 9, size="256x256").data[0].b64_json)
    blue10 = pixels(edit(client, ("b.png", BLUE, "image/png"), 10, size="256x256").data[0].b64_json)
    assert np.abs(out0 - red9).max() <= 1 < np.abs(out0 - blue9).max()
    assert np.abs(out1 - blue10).max() <= 1


def test_auto_size_follows_the_source_and_formats(client: openai.OpenAI) -> None:
    r = edit(client, ("wide.png", png((1, 2, 3), (2000, 1000)), "image/png"), 1,
             strength=1.0, output_format="jpeg")
    image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json or "")))
    assert image.format == "JPEG" and image.size == (1024, 512)  # aspect kept, within bounds
    assert r.size == "1024x512"


def test_json_body_with_data_url(base_url: str) -> None:
    url = "data:image/png;base64," + base64.b64encode(RED).decode()
    r = httpx.post(f"{base_url}/v1/images/edits", timeout=60, json={
        "prompt": "x", "images": [{"image_url": url}], "size": "256x256", "seed": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def _multipart(base_url: str, files: list[tuple[str, tuple[str, bytes, str]]],
               **data: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/edits", files=files,
                      data={"prompt": "x", **data}, timeout=60)


BAD = [
    ([("image", ("a.png", RED, "image/png")), ("mask", ("m.png", RED, "image/png"))], {},
     "mask"),
    ([], {}, "image"),
    ([("image", ("a.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"))], {},
     "image"),
    ([("image", ("a.png", RED[:60], "image/png"))], {}, "image"),
    ([("image", ("a.pdf", b"%PDF-1.4\n%...", "application/pdf"))], {}, "image"),
    ([("image[]", ("a.png", RED, "image/png"))] * 9, {}, "image"),
    ([("image", ("a.png", RED, "image/png"))], {"strength": "0.1"}, "strength"),
    ([("image", ("a.png", RED, "image/png"))], {"strength": "0.5", "steps": "1"}, "strength"),
    ([("image", ("a.png", RED, "image/png"))], {"n": "11"}, "n"),
    ([("image", ("a.png", RED, "image/png"))], {"size": "100x100"}, "size"),
    ([("image", ("a.png", RED, "image/png"))], {"model": "dall-e-2"}, "model"),
]


@pytest.mark.parametrize(("files", "data", "param"), BAD)
def test_bad_input(base_url: str, files: list[tuple[str, tuple[str, bytes, str]]],
                   data: dict[str, str], param: str) -> None:
    r = _multipart(base_url, files, **data)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param


def test_missing_prompt(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/images/edits", timeout=60,
                   files=[("image", ("a.png", RED, "image/png"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# -- images/variations (issue 15, item 3) -----------------------------------------------------

def test_variations_through_the_openai_sdk(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.create_variation(
        image=("red.png", RED, "image/png"), n=2, size="256x256", response_format="b64_json",
        extra_body={"seed": 3})
    r = raw.parse()
    assert raw.headers["x-spillway-route"] == "local"
    assert [d.model_extra["seed"] for d in r.data] == [3, 4]
    first = pixels(r.data[0].b64_json)
    assert first.shape == (256, 256, 3)
    assert np.abs(first - pixels(r.data[1].b64_json)).mean() > 1  # seeds differ
    # a variation is of its source: another picture in, another picture out
    other = client.images.create_variation(image=("blue.png", BLUE, "image/png"),
                                           size="256x256", response_format="b64_json",
                                           extra_body={"seed": 3})
    assert np.abs(first - pixels(other.data[0].b64_json)).max() > 4
    # and not an edit with a prompt: the same source and seed as images.edit differ
    edited = edit(client, ("red.png", RED, "image/png"), 3, size="256x256")
    assert np.abs(first - pixels(edited.data[0].b64_json)).max() > 0
    url = client.images.create_variation(image=("red.png", RED, "image/png"))
    assert url.data[0].url is not None or url.data[0].b64_json is not None


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": "a cat"}, "prompt"),  # a variation has no prompt: refused by name
    ({"model": "dall-e-2"}, "model"),
    ({"n": "11"}, "n"),
    ({"size": "100x100"}, "size"),
])
def test_variations_refuse_what_they_do_not_take(base_url: str, fields: dict[str, str],
                                                 param: str) -> None:
    r = httpx.post(f"{base_url}/v1/images/variations", data=fields,
                   files={"image": ("red.png", RED, "image/png")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    missing = httpx.post(f"{base_url}/v1/images/variations", data={"n": "1"}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"


# -- inpainting: images/edits with a mask (issue 15, item 2) ----------------------------------

def mask_png(transparent: tuple[int, int, int, int] | None, size: tuple[int, int] = (256, 256),
             mode: str = "RGBA") -> bytes:
    """Opaque everywhere but ``transparent`` (a box), as OpenAI's masks are drawn."""
    image = Image.new(mode, size, (0, 0, 0, 255) if mode == "RGBA" else (0, 0, 0))
    if transparent is not None:
        image.paste((0, 0, 0, 0), transparent)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def noisy_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_mask_repaints_its_transparent_area_only(client: openai.OpenAI) -> None:
    source = noisy_png(1)
    r = client.images.edit(image=("src.png", source, "image/png"),
                           mask=("mask.png", mask_png((0, 0, 128, 256)), "image/png"),
                           prompt="a red door", size="256x256", response_format="b64_json",
                           n=2, extra_body={"seed": 11})
    src = np.asarray(Image.open(io.BytesIO(source)).convert("RGB")).astype(int)
    for d in r.data:
        out = pixels(d.b64_json)
        assert np.array_equal(out[:, 128:], src[:, 128:])  # opaque in the mask: kept
        assert np.abs(out[:, :128] - src[:, :128]).mean() > 5  # transparent: repainted
    assert np.abs(pixels(r.data[0].b64_json) - pixels(r.data[1].b64_json)).mean() > 0.5


@pytest.mark.parametrize(("mask", "says"), [
    (mask_png(None), "no fully transparent pixel"),
    (mask_png(None, mode="RGB"), "no fully transparent pixel"),
    (mask_png((0, 0, 10, 10), size=(128, 128)), "must be the same size"),
])
def test_a_mask_that_cannot_be_used_is_a_400_on_mask(base_url: str, mask: bytes,
                                                     says: str) -> None:
    r = httpx.post(f"{base_url}/v1/images/edits", timeout=60,
                   data={"prompt": "a red door", "size": "256x256"},
                   files=[("image", ("src.png", RED, "image/png")),
                          ("mask", ("mask.png", mask, "image/png"))])
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "mask" and says in error["message"]


def test_a_mask_as_a_json_image_url(base_url: str) -> None:
    """The JSON form of an edit (and so a Batch API line) takes ``mask.image_url``."""
    def url(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    source = noisy_png(2)
    r = httpx.post(f"{base_url}/v1/images/edits", timeout=60, json={
        "prompt": "a red door", "size": "256x256", "seed": 4, "response_format": "b64_json",
        "images": [{"image_url": url(source)}],
        "mask": {"image_url": url(mask_png((0, 0, 256, 100)))}})
    assert r.status_code == 200, r.text
    out = pixels(r.json()["data"][0]["b64_json"])
    src = np.asarray(Image.open(io.BytesIO(source)).convert("RGB")).astype(int)
    assert np.array_equal(out[100:], src[100:]) and not np.array_equal(out[:100], src[:100])


# -- streamed images (issue 15, item 4) -------------------------------------------------------

def test_a_streamed_generation_and_edit_through_the_openai_sdk(client: openai.OpenAI) -> None:
    events = list(client.images.generate(prompt="a red bicycle", size="256x256", n=2,
                                         stream=True, partial_images=2,  # one step: none
                                         extra_body={"seed": 5}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    plain = client.images.generate(prompt="a red bicycle", size="256x256", n=2,
                                   response_format="b64_json", extra_body={"seed": 5})
    for event, whole in zip(events, plain.data, strict=True):
        assert event.size == "256x256" and event.output_format == "png"
        assert np.array_equal(pixels(event.b64_json), pixels(whole.b64_json))
    edited = list(client.images.edit(image=("red.png", RED, "image/png"), prompt="blue",
                                     size="256x256", stream=True, extra_body={"seed": 5}))
    assert [e.type for e in edited] == ["image_edit.completed"]
    assert pixels(edited[0].b64_json).shape == (256, 256, 3)


def test_what_a_stream_cannot_carry_is_refused_by_name(base_url: str) -> None:
    def streamed(**body: object) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/images/generations", timeout=60,
                          json={"prompt": "x", "size": "256x256", "stream": True, **body})
    r = streamed(partial_images=1, quality="high")  # four steps: partials not made yet
    assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images"
    r = streamed(response_format="url")
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = streamed(partial_images=4)
    assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images"
