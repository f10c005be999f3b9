"""server/catalog.py, the one place for model names: its pure answers, without HTTP
(tests/api/test_model_names.py pins what every endpoint answers over the wire)."""

from __future__ import annotations

import pytest

from server import catalog
from server.config import RouterSettings, Settings, VlmSettings
from server.errors import APIError

ALIASES = ["house-vlm", "gpt-4.1-mini"]


def refusal(call: object, *args: object, **kwargs: object) -> tuple[int, str | None] | None:
    assert callable(call)
    try:
        call(*args, **kwargs)
    except APIError as err:
        return err.status, err.code
    return None


@pytest.mark.parametrize(("name", "cloud"), [
    (None, None), ("", None), ("auto", None), ("sdxl-turbo", None), ("local-vlm", None),
    ("gpt-image-1", "openai"), ("GPT-4o-mini", "openai"), ("dall-e-3", "openai"),
    ("chatgpt-4o-latest", "openai"), ("o3-mini", "openai"),
    ("gemini-2.5-flash-image", "gemini"), ("Gemini-2.5-Flash", "gemini"),
    ("house-vlm", None), ("imagen-4", None),
])
def test_cloud_of(name: str | None, cloud: str | None) -> None:
    assert catalog.cloud_of(name) == cloud


def test_local_ids_are_per_task_and_never_auto() -> None:
    assert catalog.local_ids("image", ALIASES) == {"sdxl-turbo"}
    assert catalog.local_ids("vision", ALIASES) == {"local-vlm", *ALIASES}
    assert catalog.chat_names(ALIASES) == {"local-vlm", "auto", *ALIASES}
    assert catalog.local_chat_model("gpt-4.1-mini", ALIASES) == "local-vlm"
    assert catalog.local_chat_model("gpt-4o-mini", ALIASES) == "gpt-4o-mini"


@pytest.mark.parametrize(("name", "images", "chat", "chat_without_vlm"), [
    (None, None, None, None),
    ("", None, (404, "model_not_found"), (404, "model_not_found")),
    ("auto", None, None, None),
    ("sdxl-turbo", None, (404, "model_not_found"), (404, "model_not_found")),
    ("local-vlm", (404, "model_not_found"), None, (404, "model_not_found")),
    ("house-vlm", (404, "model_not_found"), None, (404, "model_not_found")),
    ("gpt-4.1-mini", None, None, (404, "model_not_found")),
    ("gpt-image-1", None, None, None),
    ("no-such-model", (404, "model_not_found"), (404, "model_not_found"),
     (404, "model_not_found")),
])
def test_what_images_and_chat_accept(name: str | None, images: object, chat: object,
                                     chat_without_vlm: object) -> None:
    assert refusal(catalog.check_image_model, name) == images
    if name is not None:
        assert refusal(catalog.check_chat_model, name, ALIASES, chat_enabled=True) == chat
        assert refusal(catalog.check_chat_model, name, ALIASES,
                       chat_enabled=False) == chat_without_vlm


@pytest.mark.parametrize(("name", "image", "route", "explicit"), [
    ("sdxl-turbo", True, "sdxl-turbo", "sdxl-turbo"),
    ("sdxl-turbo", False, 400, 400),
    ("local-vlm", False, "local-vlm", "local-vlm"),
    ("local-vlm", True, 400, 400),
    ("house-vlm", False, "house-vlm", "house-vlm"),
    ("house-vlm", True, 404, 404),
    ("auto", True, "auto", "auto"),
    ("gemini-2.5-flash", False, "auto", "gemini-2.5-flash"),
    ("gemini-2.5-flash-image", True, "auto", "gemini-2.5-flash-image"),
    ("gpt-image-1", True, "gpt-image-1", "gpt-image-1"),
    ("SDXL-Turbo", True, 404, 404),
])
def test_gemini_job_model(name: str, image: bool, route: object, explicit: object) -> None:
    for names, want in (("route", route), ("explicit", explicit)):
        try:
            got: object = catalog.gemini_job_model(name, image, cloud_names=names,
                                                   vlm_aliases=ALIASES)
        except APIError as err:
            got = err.status
        assert got == want, (name, image, names)


def test_gemini_image_by_name() -> None:
    assert catalog.gemini_image_by_name("sdxl-turbo")
    assert catalog.gemini_image_by_name("gemini-2.5-flash-image")
    assert not catalog.gemini_image_by_name("local-vlm")
    assert not catalog.gemini_image_by_name("SDXL-Turbo")


def test_gemini_listed() -> None:
    settings = Settings(vlm=VlmSettings(max_tokens_cap=99),
                        router=RouterSettings(gemini_names="explicit"))
    listed = catalog.gemini_listed(settings, images=False, chat=True, context=1234)
    assert [(m.name, m.methods, m.input_limit, m.output_limit) for m in listed] == [
        ("local-vlm", catalog.TEXT_METHODS, 1234, 99),
        (settings.gemini.image_model, ("generateContent",), 1234, 99),
        (settings.gemini.vision_model, catalog.TEXT_METHODS, 1234, 99)]
    assert listed[1].description.endswith(", sent to Gemini.")
    only_images = catalog.gemini_listed(Settings(), images=True, chat=False, context=5)
    assert (only_images[0].name, only_images[0].input_limit) == ("sdxl-turbo", 77)
    assert "local first" in only_images[1].description
