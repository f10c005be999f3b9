"""Wire-request checks and the url image store (pure, no HTTP)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from server.config import ImageSettings
from server.errors import APIError
from server.store.image_store import ImageStore
from server.wire.openai_chat import ChatRequest
from server.wire.openai_images import (
    ImageGenerationRequest,
    check_stream,
    edit_size,
    parse_size,
    seeds_for,
    to_image_job,
)


def test_parse_size() -> None:
    limits = ImageSettings()
    assert parse_size("auto", limits) == (512, 512)
    assert parse_size(None, limits) == (512, 512)
    assert parse_size("1024x1024", limits) == (1024, 1024)
    assert parse_size("768X512", limits) == (768, 512)
    for bad in ("abc", "8192x8192", "512x500", "128x128", "512", "x512", "-512x512", "1e3x512"):
        with pytest.raises(APIError) as exc:
            parse_size(bad, limits)
        assert exc.value.status == 400 and exc.value.param == "size"


def test_seeds() -> None:
    assert seeds_for(7, 3) == [7, 8, 9]
    assert seeds_for(2**63 - 1, 2) == [2**63 - 1, 0]
    drawn = seeds_for(None, 4)
    assert len(set(drawn)) == 4


def test_quality_maps_to_steps_and_extension_wins() -> None:
    limits = ImageSettings()
    job = to_image_job(ImageGenerationRequest(prompt="x", quality="high"), "sdxl-turbo", limits)
    assert job.steps == 4 and job.response_format == "b64_json"
    job = to_image_job(ImageGenerationRequest(prompt="x", quality="low", steps=3), "m", limits)
    assert job.steps == 3
    job = to_image_job(ImageGenerationRequest(prompt="x", n=3, seed=1), "m", limits)
    assert [i.seed for i in job.items()] == [1, 2, 3]
    # streamed: no url answers, no partial images where the job has intermediate steps
    streamed = ImageGenerationRequest(prompt="x", stream=True, partial_images=2)
    check_stream(streamed, to_image_job(streamed, "m", limits))  # 1 step: none to make
    high = ImageGenerationRequest(prompt="x", stream=True, partial_images=2, quality="high")
    with pytest.raises(APIError) as exc:
        check_stream(high, to_image_job(high, "m", limits))
    assert exc.value.param == "partial_images"
    as_url = ImageGenerationRequest(prompt="x", stream=True, response_format="url")
    with pytest.raises(APIError) as exc:
        check_stream(as_url, to_image_job(as_url, "m", limits))
    assert exc.value.param == "response_format"


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(("model", "body", "where"), [
    (ImageGenerationRequest, {"prompt": "x", "user": "\ud800"}, "user"),
    (ImageGenerationRequest, {"prompt": "x", "unknown": ["\udfff"]}, "unknown[0]"),
    (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "a\ud800"}]},
     "messages[0].content"),
    (ChatRequest, {"model": "m", "messages": [{"\ud800": 1}]}, "messages[0].\\ud800"),
    # the body is one level; 64 levels below it are one too many
    (ChatRequest, {"model": "m", "messages": [{}], "stream_options": nested(64)},
     "stream_options" + "[0]" * 63),
])
def test_wire_models_refuse_what_no_encoder_takes(model: type[BaseModel],
                                                   body: dict[str, object],
                                                   where: str) -> None:
    """Every string of a parsed body, wherever it is (keys too), is valid Unicode, and no
    body nests deeper than safejson allows; the error's location is the path."""
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    assert exc.value.errors()[0]["loc"] == (where,)
    ChatRequest.model_validate({"model": "m", "messages": [{"x": nested(61)}]})  # at the limit


def test_image_store_expires_and_caps_bytes() -> None:
    now = [1000.0]
    store = ImageStore(ttl_s=60, max_bytes=10, clock=lambda: now[0])
    a, _ = store.put(b"12345", "image/png")
    b, _ = store.put(b"67890", "image/png")
    got = store.get(a)
    assert got is not None and got.data == b"12345"
    c, _ = store.put(b"abc", "image/png")  # over 10 bytes: the oldest goes
    assert store.get(a) is None and store.get(b) is not None and store.get(c) is not None
    now[0] += 61
    assert store.get(b) is None and store.get(c) is None


def test_image_store_evicts_from_the_largest_holder() -> None:
    store = ImageStore(ttl_s=60, max_bytes=10, clock=lambda: 0.0)
    a1, _ = store.put(b"aaa", "image/png", "key:a")
    burst = [store.put(b"bb", "image/png", "key:b")[0] for _ in range(6)]
    # 3 + 12 bytes: b holds the most, so b's oldest go until the store fits
    assert store.get(a1) is not None
    assert [store.get(i) is not None for i in burst] == [False] * 3 + [True] * 3
    # a holding the most pays next, however long ago it stored
    a2, _ = store.put(b"aaaa", "image/png", "key:a")
    assert store.get(a1) is None and store.get(a2) is not None
    assert sum(store.get(i) is not None for i in burst) == 3


def test_edit_size_of_a_fitted_source_is_its_size() -> None:
    """Edit sources arrive fitted to edit_size of their original; to_edit_job computes the
    size again from the fitted one and must get the same (so nothing is resized twice)."""
    limits = ImageSettings()
    for w in range(8, 5000, 97):
        for h in (8, 100, 257, 512, 1000, 1023, 4000, 9000):
            fitted = edit_size(None, (w, h), limits)
            assert edit_size(None, fitted, limits) == fitted, (w, h)
