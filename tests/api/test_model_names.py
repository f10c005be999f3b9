"""Every model name a client can send, and what each endpoint answers for it today.

A table, pinned over HTTP against the real app (tiny local models, fake OpenAI and Gemini
upstreams on loopback), so that the model-name rules can move into one catalog without
any answer changing. The endpoints really differ, and the table says where:

- images (generations and edits) accept no model and ``""``; chat does not;
- chat accepts the VLM aliases from settings; images do not (a cloud-shaped alias is a
  cloud name there);
- a local name of the other task is a 404 on the OpenAI endpoints, a 400 on Gemini's;
- on the Gemini API, ``gemini-*`` names run locally under ``router.gemini_names=route``
  and go to Gemini under ``explicit``.

An answer is ``local``, ``openai:<upstream model>``, ``gemini:<upstream model>`` or
``<status> <code>``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from server.app import create_app
from server.config import (
    GeminiSettings,
    OpenAISettings,
    RateLimit,
    RouterSettings,
    Settings,
    VlmSettings,
)
from tests.conftest import serve
from tests.fakes.gemini_server import running_fake_gemini
from tests.fakes.openai_server import running_fake_openai

ALIASES = ["house-vlm", "gpt-4.1-mini"]  # a plain alias and a cloud-shaped one
UNSET = object()  # the request carries no model at all
NAMES: list[Any] = [UNSET, "", "auto", "sdxl-turbo", "local-vlm", "house-vlm",
                    "gpt-4.1-mini", "gpt-image-1", "gpt-4o-mini", "gemini-2.5-flash-image",
                    "gemini-2.5-flash", "dall-e-3", "GPT-Image-1", "SDXL-Turbo",
                    "no-such-model"]
NF = "404 model_not_found"
GNF, G400 = "404 MODEL_NOT_FOUND", "400 INVALID_VALUE"  # Google's shape: details[].reason
# name -> (images generations, images edits, chat completions)
OPENAI_TABLE: dict[Any, tuple[str, str, str]] = {
    UNSET: ("local", "local", "400 invalid_value"),  # chat requires a model
    "": ("local", "local", NF),
    "auto": ("local", "local", "local"),
    "sdxl-turbo": ("local", "local", NF),
    "local-vlm": (NF, NF, "local"),
    "house-vlm": (NF, NF, "local"),
    # a chat model has no image price: asked for an image it is never sent (issue 14)
    "gpt-4.1-mini": ("400 model_not_priced", "400 model_not_priced", "local"),
    "gpt-image-1": ("openai:gpt-image-1", "openai:gpt-image-1", "openai:gpt-image-1"),
    "gpt-4o-mini": ("400 model_not_priced", "400 model_not_priced", "openai:gpt-4o-mini"),
    "gemini-2.5-flash-image": ("gemini:gemini-2.5-flash-image",
                               "gemini:gemini-2.5-flash-image",
                               "gemini:gemini-2.5-flash-image"),
    "gemini-2.5-flash": ("gemini:gemini-2.5-flash", "gemini:gemini-2.5-flash",
                         "gemini:gemini-2.5-flash"),
    # an image model has no token price: as a chat model it is never sent (issue 14)
    "dall-e-3": ("openai:dall-e-3", "openai:dall-e-3", "400 model_not_priced"),
    "GPT-Image-1": ("openai:GPT-Image-1", "openai:GPT-Image-1", "openai:GPT-Image-1"),
    "SDXL-Turbo": (NF, NF, NF),
    "no-such-model": (NF, NF, NF),
}
GEMINI_NAMES = [n for n in NAMES if n not in (UNSET, "")]  # the name is a path segment
# (name, gemini_names) -> (responseModalities IMAGE, TEXT, none: decided by the name)
GEMINI_TABLE: dict[tuple[str, str], tuple[str, str, str]] = {}
for _mode in ("route", "explicit"):
    _g = "auto" if _mode == "route" else "gemini"
    GEMINI_TABLE.update({
        ("auto", _mode): ("local", "local", "local"),
        ("sdxl-turbo", _mode): ("local", G400, "local"),
        ("local-vlm", _mode): (G400, "local", "local"),
        ("house-vlm", _mode): (GNF, "local", "local"),
        ("gpt-4.1-mini", _mode): ("400 MODEL_NOT_PRICED", "local", "local"),
        ("gpt-image-1", _mode): ("openai:gpt-image-1", "openai:gpt-image-1",
                                 "openai:gpt-image-1"),
        ("gpt-4o-mini", _mode): ("400 MODEL_NOT_PRICED", "openai:gpt-4o-mini",
                                 "openai:gpt-4o-mini"),
        ("dall-e-3", _mode): ("openai:dall-e-3", "400 MODEL_NOT_PRICED",
                              "400 MODEL_NOT_PRICED"),
        ("GPT-Image-1", _mode): ("openai:GPT-Image-1", "openai:GPT-Image-1",
                                 "openai:GPT-Image-1"),
        ("SDXL-Turbo", _mode): (GNF, GNF, GNF),
        ("no-such-model", _mode): (GNF, GNF, GNF),
    })
    for _name in ("gemini-2.5-flash-image", "gemini-2.5-flash"):
        _cloud = "local" if _g == "auto" else f"gemini:{_name}"
        GEMINI_TABLE[(_name, _mode)] = (_cloud, _cloud, _cloud)
ROOMY = {m: RateLimit(per_minute=10_000, burst=10_000) for m in
         [n for n in NAMES if isinstance(n, str) and n]}


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Any, Any]]:
    with running_fake_openai() as oa, running_fake_gemini() as gm:
        yield oa, gm


def _settings(tiny_weights: Path, fakes: tuple[Any, Any], gemini_names: str,
              vlm: bool = True) -> Settings:
    oa, gm = fakes
    settings = Settings(
        weights_dir=tiny_weights,
        vlm=VlmSettings(enabled=vlm, aliases=ALIASES),
        openai=OpenAISettings(api_key=SecretStr("sk-test-catalog-0123456789abcdef"),
                              base_url=f"{oa.url}/v1", timeout_s=5.0),
        gemini=GeminiSettings(api_key=SecretStr("test-gemini-catalog-key-0123"),
                              base_url=gm.url, timeout_s=5.0),
        # No spill: a name that means "the router decides" always lands on the box here.
        router=RouterSettings(spill=False, gemini_names=gemini_names, rate_limits=ROOMY))
    settings.images.min_side = 64
    settings.images.default_size = "64x64"
    return settings


@pytest.fixture(scope="module", params=["route", "explicit"])
def server(request: pytest.FixtureRequest, tiny_weights: Path,
           fakes: tuple[Any, Any]) -> Iterator[tuple[str, str]]:
    with serve(create_app(_settings(tiny_weights, fakes, request.param))) as base:
        yield base, request.param


def _answer(r: httpx.Response, fakes: tuple[Any, Any]) -> str:
    if r.status_code != 200:
        error = r.json()["error"]
        code = error.get("code") if isinstance(error.get("code"), str) else None
        if code is None and isinstance(error.get("details"), list):  # Google's shape
            code = next((d.get("reason") for d in error["details"]
                         if isinstance(d, dict) and d.get("reason")), None)
        return f"{r.status_code} {code}"
    route = r.headers["x-spillway-route"]
    if route == "local":
        return "local"
    oa, gm = fakes
    call = (oa if route == "openai" else gm).calls[-1]
    if route == "openai":
        model = call.body["model"]
    else:
        model = call.path.rsplit("/", 1)[-1].partition(":")[0]
    return f"{route}:{model}"


def _with_model(body: dict[str, Any], name: Any) -> dict[str, Any]:
    return body if name is UNSET else {**body, "model": name}


def _openai_answers(base: str, name: Any, fakes: tuple[Any, Any]) -> tuple[str, str, str]:
    for fake in fakes:
        fake.reset()
    gen = httpx.post(f"{base}/v1/images/generations", timeout=60, json=_with_model(
        {"prompt": "a red square", "response_format": "b64_json", "seed": 1}, name))
    form = {"prompt": "make it blue", "response_format": "b64_json", "seed": "1"}
    edit = httpx.post(f"{base}/v1/images/edits", timeout=60,
                      data=form if name is UNSET else {**form, "model": name},
                      files={"image": ("in.png", png(), "image/png")})
    chat = httpx.post(f"{base}/v1/chat/completions", timeout=60, json=_with_model(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 1},
        name))
    return _answer(gen, fakes), _answer(edit, fakes), _answer(chat, fakes)


def _gemini_answer(base: str, name: str, modality: str | None,
                   fakes: tuple[Any, Any]) -> str:
    for fake in fakes:
        fake.reset()
    config: dict[str, Any] = {"maxOutputTokens": 2, "seed": 1}
    if modality is not None:
        config["responseModalities"] = [modality]
    r = httpx.post(f"{base}/v1beta/models/{name}:generateContent", timeout=60,
                   json={"contents": [{"role": "user", "parts": [{"text": "a red square"}]}],
                         "generationConfig": config})
    return _answer(r, fakes)


def test_the_tables_cover_every_name() -> None:
    assert list(OPENAI_TABLE) == NAMES
    assert sorted(GEMINI_TABLE) == sorted((n, m) for n in GEMINI_NAMES
                                          for m in ("route", "explicit"))


@pytest.mark.parametrize("server", ["route"], indirect=True)  # only Gemini's API reads it
def test_openai_endpoints(server: tuple[str, str], fakes: tuple[Any, Any]) -> None:
    base, _ = server
    got = {name: _openai_answers(base, name, fakes) for name in NAMES}
    assert got == OPENAI_TABLE


def test_gemini_generate_content(server: tuple[str, str], fakes: tuple[Any, Any]) -> None:
    base, mode = server
    got = {(name, mode): tuple(_gemini_answer(base, name, modality, fakes)
                               for modality in ("IMAGE", "TEXT", None))
           for name in GEMINI_NAMES}
    assert got == {k: v for k, v in GEMINI_TABLE.items() if k[1] == mode}


@pytest.mark.parametrize("server", ["route"], indirect=True)
def test_error_bodies(server: tuple[str, str]) -> None:
    """The messages, not only the codes: each kind of refusal once."""
    base, _ = server
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "model": "local-vlm"})
    assert r.status_code == 404
    assert r.json() == {"error": {
        "message": "The model 'local-vlm' does not exist on this server.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    r = httpx.post(f"{base}/v1/chat/completions", json={
        "model": "sdxl-turbo", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert r.json() == {"error": {
        "message": "The model 'sdxl-turbo' does not exist on this server.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    contents = {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    image = {**contents, "generationConfig": {"responseModalities": ["IMAGE"]}}
    text = {**contents, "generationConfig": {"responseModalities": ["TEXT"]}}
    r = httpx.post(f"{base}/v1beta/models/local-vlm:generateContent", json=image)
    assert (r.status_code, r.json()["error"]["message"]) == (
        400, "The model 'local-vlm' cannot make images.")
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
    r = httpx.post(f"{base}/v1beta/models/sdxl-turbo:generateContent", json=text)
    assert (r.status_code, r.json()["error"]["message"]) == (
        400, "The model 'sdxl-turbo' cannot answer in text; ask for responseModalities "
        "[\"IMAGE\"].")
    r = httpx.post(f"{base}/v1beta/models/no-such-model:generateContent", json=text)
    assert (r.status_code, r.json()["error"]["message"]) == (
        404, "models/no-such-model is not found for API version v1beta/v1, or is not "
        "supported for generateContent.")
    assert r.json()["error"]["status"] == "NOT_FOUND"
    r = httpx.post(f"{base}/v1beta/models/house-vlm:generateContent", json=image)
    assert r.status_code == 404
    assert r.json()["error"]["message"].startswith("models/house-vlm is not found")


def test_model_lists(server: tuple[str, str]) -> None:
    base, mode = server
    openai_ids = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    assert openai_ids == ["sdxl-turbo", "local-vlm"]
    models = httpx.get(f"{base}/v1beta/models").json()["models"]
    routed = ("served through Spillway's router: local first, spilled when the queue "
              "would miss the deadline" if mode == "route" else "sent to Gemini")
    assert [(m["name"], m["displayName"], m["description"], m["supportedGenerationMethods"])
            for m in models] == [
        ("models/sdxl-turbo", "SDXL-Turbo (local)",
         "Text-to-image and image-to-image on this box.", ["generateContent"]),
        ("models/local-vlm", "Vision-language model (local)",
         "Image understanding on this box.", ["generateContent", "streamGenerateContent"]),
        ("models/gemini-2.5-flash-image", "gemini-2.5-flash-image",
         f"gemini-2.5-flash-image, {routed}.", ["generateContent"]),
        ("models/gemini-2.5-flash", "gemini-2.5-flash", f"gemini-2.5-flash, {routed}.",
         ["generateContent", "streamGenerateContent"]),
    ]
    assert models[0]["inputTokenLimit"] == 77 and models[0]["outputTokenLimit"] == 0
    one = httpx.get(f"{base}/v1beta/models/local-vlm").json()
    assert one == models[1]
    r = httpx.get(f"{base}/v1beta/models/house-vlm")
    assert r.status_code == 404 and r.json()["error"]["message"] == (
        "models/house-vlm is not found.")


def test_without_a_vlm(tiny_weights: Path, fakes: tuple[Any, Any]) -> None:
    """With the VLM off, chat's local names (a cloud-shaped alias too) say there is no
    VLM; ``auto`` is the router's to place."""
    with serve(create_app(_settings(tiny_weights, fakes, "route", vlm=False))) as base:
        got = {name: _openai_answers(base, name, fakes)[2]
               for name in ("auto", "local-vlm", "house-vlm", "gpt-4.1-mini", "gpt-4o-mini",
                            "sdxl-turbo")}
        gemini = {name: _gemini_answer(base, name, "TEXT", fakes)
                  for name in ("local-vlm", "house-vlm", "gemini-2.5-flash")}
        names = [m["name"] for m in httpx.get(f"{base}/v1beta/models").json()["models"]]
        r = httpx.post(f"{base}/v1/chat/completions", json={
            "model": "house-vlm", "messages": [{"role": "user", "content": "hi"}]})
    # auto and the routed gemini-* name: the router finds no local model and may not spill.
    assert got == {"auto": "503 model_not_ready", "local-vlm": NF, "house-vlm": NF,
                   "gpt-4.1-mini": NF, "gpt-4o-mini": "openai:gpt-4o-mini", "sdxl-turbo": NF}
    assert gemini == {"local-vlm": GNF, "house-vlm": GNF,
                      "gemini-2.5-flash": "503 MODEL_NOT_READY"}
    assert names == ["models/sdxl-turbo", "models/gemini-2.5-flash-image",
                     "models/gemini-2.5-flash"]
    assert r.json()["error"]["message"] == "No vision-language model is enabled on this server."
