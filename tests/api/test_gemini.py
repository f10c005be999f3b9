"""The Gemini-compatible API, driven by the official google-genai SDK over loopback, on
both API versions it calls (/v1 since 3.x, /v1beta before), plus raw wire checks."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image
from pydantic import SecretStr

from pipelines.registry import MODEL_ID, WeightsInfo
from server.app import create_app
from server.config import BatchSettings, GeminiSettings, RateLimit, RouterSettings, Settings
from server.providers.local.images import LocalImages
from server.providers.local.loading import batch_policy
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.api.gated import Device, wait_for
from tests.conftest import serve
from tests.fakes.gemini_server import running_fake_gemini
from tests.ledger_rows import ledger_rows

VERSIONS = ("v1", "v1beta")
GEMINI_KEY = "test-gemini-compat-key-0123"


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def small(settings: Settings) -> Settings:
    settings.images.min_side = 64
    settings.images.default_size = "128x128"
    return settings


@pytest.fixture(scope="module")
def base_url(tiny_weights: Path) -> Iterator[str]:
    with serve(create_app(small(Settings(weights_dir=tiny_weights)))) as url:
        yield url


def sdk(base: str, version: str, key: str = "any", **headers: str) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=base, api_version=version, headers=headers or None))


def image_of(response: types.GenerateContentResponse, i: int = 0) -> Image.Image:
    assert response.candidates is not None
    content = response.candidates[i].content
    assert content is not None and content.parts is not None
    blob = content.parts[0].inline_data
    assert blob is not None and blob.data is not None and blob.mime_type == "image/png"
    image = Image.open(io.BytesIO(blob.data))
    image.load()
    return image


def route_of(response: types.GenerateContentResponse) -> str | None:
    assert response.sdk_http_response is not None and response.sdk_http_response.headers
    return response.sdk_http_response.headers.get("x-spillway-route")


@pytest.mark.parametrize("version", VERSIONS)
def test_understanding_with_inline_image(base_url: str, version: str) -> None:
    client = sdk(base_url, version)
    config = types.GenerateContentConfig(max_output_tokens=8, temperature=0, seed=7)
    red = types.Part.from_bytes(data=png((255, 0, 0)), mime_type="image/png")
    r = client.models.generate_content(model="gemini-2.5-flash",
                                       contents=[red, "What is in this picture?"],
                                       config=config)
    assert route_of(r) == "local"  # no cloud configured: gemini-* names run on the box
    assert isinstance(r.text, str) and r.text
    assert r.candidates and r.candidates[0].finish_reason in (
        types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
    usage = r.usage_metadata
    assert usage is not None and usage.candidates_token_count is not None
    assert 0 < usage.candidates_token_count <= 8
    # the image reached the model: it costs prompt tokens the text alone does not
    text_only = client.models.generate_content(
        model="local-vlm", contents="What is in this picture?", config=config)
    assert text_only.usage_metadata is not None
    assert usage.prompt_token_count > text_only.usage_metadata.prompt_token_count  # type: ignore[operator]
    # the same seed and input give the same answer
    again = client.models.generate_content(model="gemini-2.5-flash",
                                           contents=[red, "What is in this picture?"],
                                           config=config)
    assert again.text == r.text


@pytest.mark.parametrize("version", VERSIONS)
def test_image_generation(base_url: str, version: str) -> None:
    client = sdk(base_url, version)

    def gen(seed: int, **config: Any) -> types.GenerateContentResponse:
        return client.models.generate_content(
            model="gemini-2.5-flash-image", contents="a lighthouse at dusk",
            config=types.GenerateContentConfig(response_modalities=["IMAGE"], seed=seed,
                                               **config))

    a, b, c = gen(1), gen(1), gen(2)
    assert route_of(a) == "local"
    assert image_of(a).size == (128, 128)  # the server's default area, square
    assert np.array_equal(np.asarray(image_of(a)), np.asarray(image_of(b)))
    assert not np.array_equal(np.asarray(image_of(a)), np.asarray(image_of(c)))
    wide = gen(3, image_config=types.ImageConfig(aspect_ratio="16:9"),
               candidate_count=2)
    assert wide.candidates is not None and len(wide.candidates) == 2
    w, h = image_of(wide, 1).size
    assert w > h and image_of(wide, 0).size == (w, h)


def test_image_edit_uses_the_source(base_url: str) -> None:
    client = sdk(base_url, "v1")

    def edit(color: tuple[int, int, int]) -> np.ndarray:
        r = client.models.generate_content(
            model="sdxl-turbo",
            contents=[types.Part.from_bytes(data=png(color, (96, 96)), mime_type="image/png"),
                      "make it look like a painting"],
            config=types.GenerateContentConfig(response_modalities=["IMAGE"], seed=4))
        return np.asarray(image_of(r))

    black, white = edit((0, 0, 0)), edit((255, 255, 255))
    assert black.shape == (96, 96, 3)  # size follows the source
    # the tiny random VAE keeps little of its input: "another picture" is small, yet real
    assert np.abs(black.astype(int) - white.astype(int)).max() > 4
    assert np.array_equal(black, edit((0, 0, 0)))


@pytest.mark.parametrize("version", VERSIONS)
def test_streaming_matches_the_whole_answer(base_url: str, version: str) -> None:
    client = sdk(base_url, version)
    config = types.GenerateContentConfig(max_output_tokens=10, temperature=0, seed=3)
    whole = client.models.generate_content(model="gemini-2.5-flash", contents="Say hello",
                                           config=config)
    chunks = list(client.models.generate_content_stream(
        model="gemini-2.5-flash", contents="Say hello", config=config))
    assert len(chunks) >= 3  # token by token, not one block
    assert "".join(c.text or "" for c in chunks) == whole.text
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason is not None
    assert last.usage_metadata is not None
    assert last.usage_metadata.candidates_token_count == \
        whole.usage_metadata.candidates_token_count  # type: ignore[union-attr]


@pytest.mark.parametrize("query", ["", "?alt=json", "?$alt=json;enum-encoding=int"])
def test_streaming_without_sse_is_one_json_array(base_url: str, query: str) -> None:
    """Google's REST stream without alt=sse (older SDKs over REST): a JSON array of
    GenerateContentResponse objects, the same pieces as the SSE stream."""
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}],
            "generationConfig": {"maxOutputTokens": 10, "temperature": 0, "seed": 3}}
    url = f"{base_url}/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    r = httpx.post(url + query, json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    items = r.json()
    assert isinstance(items, list) and len(items) >= 3
    text = "".join(p.get("text", "") for item in items
                   for p in item["candidates"][0]["content"]["parts"])
    whole = httpx.post(url.replace("streamGenerateContent", "generateContent"), json=body,
                       timeout=60).json()
    assert text == whole["candidates"][0]["content"]["parts"][0]["text"]
    assert items[-1]["candidates"][0]["finishReason"] and items[-1]["usageMetadata"]


@pytest.mark.parametrize("version", VERSIONS)
def test_count_tokens_counts_as_the_local_model_does(base_url: str, version: str) -> None:
    client = sdk(base_url, version)
    short = client.models.count_tokens(model="gemini-2.5-flash", contents="hi")
    longer = client.models.count_tokens(model="local-vlm",
                                        contents="hi there, a much longer question")
    assert short.total_tokens is not None and longer.total_tokens is not None
    assert 0 < short.total_tokens < longer.total_tokens
    # what generateContent then reports as the prompt's tokens
    whole = client.models.generate_content(
        model="local-vlm", contents="hi there, a much longer question",
        config=types.GenerateContentConfig(max_output_tokens=2))
    assert whole.usage_metadata is not None
    assert whole.usage_metadata.prompt_token_count == longer.total_tokens
    # an image counts too (through the image processor)
    with_image = client.models.count_tokens(model="local-vlm", contents=[
        types.Part.from_bytes(data=png((200, 10, 10), (64, 64)), mime_type="image/png"),
        "hi there, a much longer question"])
    assert with_image.total_tokens is not None and with_image.total_tokens > longer.total_tokens
    r = httpx.post(f"{base_url}/{version}/models/sdxl-turbo:countTokens",
                   json={"contents": [{"parts": [{"text": "a cat"}]}]})
    _gemini_error(r, 400, "INVALID_ARGUMENT")


def test_enums_given_as_numbers(base_url: str) -> None:
    """responseModalities as the REST transport's enum numbers (enum-encoding=int)."""
    def ask(modalities: list[Any]) -> httpx.Response:
        return _raw(base_url, {"contents": [{"parts": [{"text": "a red square"}]}],
                               "generationConfig": {"responseModalities": modalities,
                                                    "maxOutputTokens": 4}},
                    model="gemini-2.5-flash-image")
    image = ask([2]).json()["candidates"][0]["content"]["parts"][0]
    assert image["inlineData"]["mimeType"] == "image/png"
    text = ask([1]).json()["candidates"][0]["content"]["parts"][0]
    assert "text" in text
    refused = ask([9])
    assert refused.status_code == 400 and "MODALITY_9" in refused.json()["error"]["message"]


def _raw(base: str, body: Any, model: str = "gemini-2.5-flash", version: str = "v1beta",
         **headers: str) -> httpx.Response:
    # json.dumps, not httpx's json=: it escapes lone surrogates instead of failing on them
    return httpx.post(f"{base}/{version}/models/{model}:generateContent",
                      content=json.dumps(body),
                      headers={"content-type": "application/json", **headers}, timeout=60)


def test_inline_data_spellings_and_alphabets(base_url: str) -> None:
    """camelCase and snake_case, standard and URL-safe base64: the same image in."""
    data = png((10, 250, 130), (61, 47))  # odd size: its base64 holds '+' or '/' somewhere
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert std != url
    config = {"maxOutputTokens": 6, "temperature": 0, "seed": 1}
    answers = set()
    for blob in ({"inlineData": {"mimeType": "image/png", "data": std}},
                 {"inline_data": {"mime_type": "image/png", "data": url}},
                 {"inlineData": {"mime_type": "image/png", "data": url}}):
        r = _raw(base_url, {"contents": [{"role": "user", "parts": [blob, {"text": "?"}]}],
                            "generation_config": config})
        assert r.status_code == 200, r.text
        answers.add(r.json()["candidates"][0]["content"]["parts"][0]["text"])
    assert len(answers) == 1


def _gemini_error(r: httpx.Response, code: int, status: str) -> str:
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


BAD = [
    ({"contents": []}, "contents"),
    ({"contents": [{"role": "user", "parts": []}]}, "parts"),
    ({"contents": [{"role": "user", "parts": [{"functionCall": {"name": "f"}}]}]},
     "Unsupported part"),
    ({"contents": [{"role": "user", "parts": [{"text": 5}]}]}, "text"),
    ({"contents": [{"role": "robot", "parts": [{"text": "hi"}]}]}, "role"),
    ({"contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}}]}]}, "only images"),
    ({"contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/png", "data": "not*base64"}}]}]}, "base64"),
    ({"contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(b"GIF89a").decode()}}
    ]}]}, "decoded"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "generationConfig": {"temperature": "hot"}}, "temperature"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "generationConfig": {"responseModalities": ["AUDIO"]}}, "AUDIO"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "generationConfig": {"maxOutputTokens": 10**9}}, "maxOutputTokens"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "generationConfig": {"candidateCount": 2}}, "candidateCount"),
    # JSON can carry a lone surrogate (\ud800) that no tokenizer takes
    ({"contents": [{"role": "user", "parts": [{"text": "hi \ud800"}]}]}, "surrogate"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
      "generationConfig": {"stopSequences": ["\udfff"]}}, "surrogate"),
    ({"contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png((1, 2, 3))).decode()}}
        for _ in range(9)]}]}, "limit"),
]


@pytest.mark.parametrize(("body", "says"), BAD)
def test_bad_input_gets_gemini_shaped_400(base_url: str, body: Any, says: str) -> None:
    message = _gemini_error(_raw(base_url, body), 400, "INVALID_ARGUMENT")
    assert says.lower() in message.lower(), message


def test_errors_in_gemini_shape(base_url: str) -> None:
    hello = {"contents": [{"parts": [{"text": "hi"}]}]}
    # unknown model: 404 NOT_FOUND, through the SDK too
    client = sdk(base_url, "v1")  # held: a dropped Client closes its connection pool
    with pytest.raises(genai_errors.ClientError) as exc:
        client.models.generate_content(model="no-such-model", contents="hi")
    assert exc.value.code == 404 and exc.value.status == "NOT_FOUND"
    _gemini_error(_raw(base_url, hello, model="no-such-model", version="v1"), 404, "NOT_FOUND")
    # a Gemini method this server does not answer: 404 naming it, on both versions
    r = httpx.post(f"{base_url}/v1beta/models/gemini-2.5-flash:embedContent", json=hello)
    assert "embedContent" in _gemini_error(r, 404, "NOT_FOUND")
    # not JSON, and a body over the cap
    r = httpx.post(f"{base_url}/v1beta/models/gemini-2.5-flash:generateContent",
                   content=b"{nope", headers={"content-type": "application/json"})
    _gemini_error(r, 400, "INVALID_ARGUMENT")
    huge = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png",
                                                    "data": "A" * (26 * 2**20)}}]}]}
    _gemini_error(_raw(base_url, huge), 413, "INVALID_ARGUMENT")
    # streaming answers as SSE (alt=sse) or one JSON array (alt=json); nothing else
    r = httpx.post(f"{base_url}/v1/models/gemini-2.5-flash:streamGenerateContent?alt=proto",
                   json=hello)
    _gemini_error(r, 400, "INVALID_ARGUMENT")
    # the OpenAI endpoints keep their own shape
    r = httpx.post(f"{base_url}/v1/images/generations", json={"prompt": ""})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param",
                                                               "code"}


def test_file_uri_goes_through_the_ssrf_rules(base_url: str) -> None:
    """A fileData URI pointing at a loopback canary is refused before any byte is sent."""
    hits: list[str] = []

    class Canary(threading.Thread):
        def run(self) -> None:
            import http.server

            class H(http.server.BaseHTTPRequestHandler):
                def do_GET(self) -> None:  # noqa: N802
                    hits.append(self.path)
                    self.send_response(200)
                    self.end_headers()

                def log_message(self, *args: object) -> None:
                    pass

            self.server = http.server.HTTPServer(("127.0.0.1", 0), H)
            self.port = self.server.server_address[1]
            ready.set()
            self.server.serve_forever()

    ready = threading.Event()
    canary = Canary(daemon=True)
    canary.start()
    assert ready.wait(5)
    try:
        for uri in (f"http://127.0.0.1:{canary.port}/x.png",
                    f"http://localhost:{canary.port}/x.png",
                    f"http://[::ffff:127.0.0.1]:{canary.port}/x.png",
                    "http://169.254.169.254/latest/meta-data/"):
            body = {"contents": [{"parts": [
                {"fileData": {"mimeType": "image/png", "fileUri": uri}}, {"text": "?"}]}]}
            message = _gemini_error(_raw(base_url, body), 400, "INVALID_ARGUMENT")
            assert "fileData" in message or "address" in message.lower(), message
    finally:
        canary.server.shutdown()
    assert hits == []


def test_keys_in_x_goog_api_key_and_quota_as_resource_exhausted(tiny_weights: Path,
                                                                tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    settings = small(Settings(weights_dir=tiny_weights, ledger_url=url))
    with serve(create_app(settings, chat_loader=None)) as base:
        store = KeyStore(Ledger(url))
        key = store.create("gemini-team", daily_images=1)
        time.sleep(2.1)  # the server's key cache refreshes
        config = types.GenerateContentConfig(response_modalities=["IMAGE"], seed=1)
        # clients are held: a dropped Client closes its connection pool
        good, wrong = sdk(base, "v1", key=key), sdk(base, "v1", key="wrong-key")
        r = good.models.generate_content(
            model="gemini-2.5-flash-image", contents="a cat", config=config)
        assert image_of(r).size == (128, 128)
        with pytest.raises(genai_errors.ClientError) as exc:
            wrong.models.generate_content(
                model="gemini-2.5-flash-image", contents="a cat", config=config)
        assert exc.value.code == 401 and exc.value.status == "UNAUTHENTICATED"
        assert "wrong-key" not in str(exc.value)
        # curl users put the key in the query, as Google's REST examples do
        hello = {"contents": [{"parts": [{"text": "x"}]}],
                 "generationConfig": {"responseModalities": ["IMAGE"]}}
        r2 = httpx.post(f"{base}/v1beta/models/sdxl-turbo:generateContent?key=wrong-key",
                        json=hello)
        _gemini_error(r2, 401, "UNAUTHENTICATED")
        assert "wrong-key" not in r2.text
        beta = sdk(base, "v1beta", key=key)
        with pytest.raises(genai_errors.ClientError) as exc:
            beta.models.generate_content(
                model="gemini-2.5-flash-image", contents="a cat", config=config)
        assert exc.value.code == 429 and exc.value.status == "RESOURCE_EXHAUSTED"
        r3 = httpx.post(f"{base}/v1beta/models/sdxl-turbo:generateContent?key={key}",
                        json=hello)  # accepted (else 401), and over its quota too
        _gemini_error(r3, 429, "RESOURCE_EXHAUSTED")
        # the ledger has the answered request under the key's name and the asked model,
        # and the refused one at no cost
        rows = [r for r in ledger_rows(url) if r.key_name == "gemini-team"]
        assert [(r.status, r.route, r.images, r.model) for r in reversed(rows)] == [
            (200, "local", 1, "gemini-2.5-flash-image"),
            (429, "none", 0, "gemini-2.5-flash-image"),
            (429, "none", 0, "sdxl-turbo")]
        assert rows[-1].endpoint == "/v1/models/{model}:generateContent"
        assert all(r.cost_usd == 0 for r in rows[:2])


def test_router_spills_gemini_calls_to_gemini(tiny_weights: Path, device: Device,
                                              weights: WeightsInfo, tmp_path: Path) -> None:
    """Same router as the OpenAI endpoints: with the device busy and a short deadline the
    job spills (to Gemini here) and comes back in Gemini's shape; with time to wait it
    stays local."""
    roomy = {m: RateLimit(per_minute=1000, burst=1000)
             for m in ("gemini-2.5-flash-image", "gemini-2.5-flash")}
    with running_fake_gemini() as fake:
        settings = Settings(  # the gated engine's own limits: sides of 256 and up
            weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
            gemini=GeminiSettings(api_key=SecretStr(GEMINI_KEY), base_url=fake.url,
                                  timeout_s=5.0),
            router=RouterSettings(image_provider="gemini", rate_limits=roomy))
        settings.images.default_size = "256x256"
        local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings), 60)
        with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base:
            config = types.GenerateContentConfig(response_modalities=["IMAGE"], seed=2)
            client = sdk(base, "v1")
            warm = client.models.generate_content(
                model="gemini-2.5-flash-image", contents="warm", config=config)
            assert route_of(warm) == "local" and fake.calls == []
            device.gate.clear()  # the device is busy from now on
            with ThreadPoolExecutor(2) as pool:
                blocked = [pool.submit(httpx.post, f"{base}/v1/images/generations",
                                       json={"prompt": f"busy {i}", "size": "256x256"},
                                       timeout=60) for i in range(2)]
                wait_for(device.busy.is_set)
                hurried = sdk(base, "v1beta", **{"x-spillway-max-wait-ms": "0"})
                r = hurried.models.generate_content(model="gemini-2.5-flash-image",
                                                    contents="a harbour", config=config)
                assert route_of(r) == "gemini"
                assert image_of(r).size == (256, 256)  # cropped to what was asked
                assert len(fake.calls_to(":generateContent")) == 1
                assert GEMINI_KEY not in str(r.model_dump())
                device.gate.set()
                assert all(f.result().status_code == 200 for f in blocked)


def test_explicit_gemini_names_reach_gemini(tiny_weights: Path, tmp_path: Path) -> None:
    """``router.gemini_names=explicit``: a gemini-* name goes to Gemini itself, as an
    explicit cloud model does on the OpenAI endpoints; its answer comes back as it was."""
    roomy = {"gemini-2.5-flash": RateLimit(per_minute=1000, burst=1000)}
    with running_fake_gemini() as fake:
        settings = Settings(
            weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
            gemini=GeminiSettings(api_key=SecretStr(GEMINI_KEY), base_url=fake.url,
                                  timeout_s=5.0),
            router=RouterSettings(gemini_names="explicit", rate_limits=roomy))
        with serve(create_app(settings, loader=None, chat_loader=None)) as base:
            client = sdk(base, "v1")
            red = types.Part.from_bytes(data=png((255, 0, 0)), mime_type="image/png")
            r = client.models.generate_content(model="gemini-2.5-flash",
                                               contents=[red, "Describe it"])
            assert route_of(r) == "gemini"
            assert r.text == "echo: Describe it [images: 1]"  # the image went up too
            assert len(fake.calls_to("gemini-2.5-flash:generateContent")) == 1
            chunks = list(client.models.generate_content_stream(
                model="gemini-2.5-flash", contents="Describe it"))
            assert "".join(c.text or "" for c in chunks) == "echo: Describe it [images: 0]"
            # the local models are still named explicitly: none is loaded here
            with pytest.raises(genai_errors.APIError) as exc:
                client.models.generate_content(model="local-vlm", contents="hi")
            assert exc.value.code in (404, 503)


def test_full_queue_is_resource_exhausted_with_retry_info(
        tiny_weights: Path, device: Device, weights: WeightsInfo, tmp_path: Path) -> None:
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
                        batch=BatchSettings(max_queue=10, warmup=False))
    settings.images.default_size = "256x256"
    local = LocalImages(MODEL_ID, weights, device.generate, batch_policy(settings), 60)
    with serve(create_app(settings, loader=lambda _: local, chat_loader=None)) as base:
        device.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            def fill(prompt: str) -> Any:
                return pool.submit(httpx.post, f"{base}/v1/images/generations", timeout=60,
                                   json={"prompt": prompt, "n": 10, "size": "256x256"})

            running = fill("on the device")
            wait_for(device.busy.is_set)
            waiting = fill("in the queue")  # 10 queued: the queue is full
            wait_for(lambda: httpx.get(f"{base}/v1/models").json()["data"][0]["spillway"]
                     ["queued"] == 10)
            client = genai.Client(api_key="x", http_options=types.HttpOptions(
                base_url=base, api_version="v1", timeout=10_000))
            try:
                with pytest.raises(genai_errors.ClientError) as exc:
                    client.models.generate_content(
                        model="sdxl-turbo", contents="one more",
                        config=types.GenerateContentConfig(response_modalities=["IMAGE"]))
            finally:
                device.gate.set()
            assert running.result().status_code == 200
            assert waiting.result().status_code == 200
    assert exc.value.code == 429 and exc.value.status == "RESOURCE_EXHAUSTED"
    details = exc.value.details["error"]["details"]
    retry = [d for d in details if d["@type"].endswith("google.rpc.RetryInfo")]
    assert retry and retry[0]["retryDelay"].endswith("s")
    assert int(retry[0]["retryDelay"][:-1]) >= 1


@pytest.mark.parametrize("version", VERSIONS)
def test_models_list_and_get(base_url: str, version: str) -> None:
    """``client.models.list()/get()`` work on both versions; on /v1 the path is shared
    with the OpenAI API, which keeps its own shape for its own SDK."""
    client = sdk(base_url, version)
    names = {m.name for m in client.models.list()}
    assert {"models/sdxl-turbo", "models/local-vlm", "models/gemini-2.5-flash",
            "models/gemini-2.5-flash-image"} <= names
    vlm = client.models.get(model="local-vlm")
    assert vlm.supported_actions is not None and "streamGenerateContent" in vlm.supported_actions
    assert vlm.input_token_limit and vlm.output_token_limit
    with pytest.raises(genai_errors.ClientError) as exc:
        client.models.get(model="no-such-model")
    assert exc.value.code == 404 and exc.value.status == "NOT_FOUND"
    oa = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
    assert {m.id for m in oa.models.list()} == {"sdxl-turbo", "local-vlm"}
    assert oa.models.retrieve("sdxl-turbo").owned_by == "spillway"
    with pytest.raises(openai.NotFoundError) as oexc:
        oa.models.retrieve("no-such-model")
    assert oexc.value.body["code"] == "model_not_found"  # type: ignore[index]
