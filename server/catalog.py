"""ONE place for model names: which names run locally, which cloud a name belongs to, what
each API accepts, and what the Gemini model list shows.

Pure: no HTTP, no state; settings come in as arguments. The APIs really differ, on purpose
(tests/api/test_model_names.py pins every answer):

- images (generations, edits) accept no model and ``""`` (the router decides); chat needs
  a name;
- chat accepts the VLM aliases from settings (cloud names the operator chose to answer
  locally); images do not, so a cloud-shaped alias is a cloud name there;
- a local name of the other task is a 404 on the OpenAI endpoints (OpenAI says "no such
  model"), a 400 on Gemini's (the name exists, it cannot do that);
- on the Gemini API ``gemini-*`` names mean "a job of this kind" for the router
  (``router.gemini_names="route"``) or Gemini itself (``"explicit"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pipelines.registry import SDXL, VLM
from server.config import Settings, UpstreamSettings
from server.errors import APIError, bad_request, model_not_found

Task = Literal["image", "vision"]
IMAGE_MODEL = SDXL.model_id  # "sdxl-turbo"
VLM_MODEL = VLM.model_id  # "local-vlm"
AUTO = "auto"  # the router decides, local first
CLOUDS = ("openai", "gemini")  # the upstreams of the two-cloud (section) configuration
# What the images endpoints take as "not a cloud name": absent, empty, auto, the local model.
IMAGE_NAMES: frozenset[str | None] = frozenset({None, "", AUTO, IMAGE_MODEL})
LOCAL_MODELS = frozenset({IMAGE_MODEL, VLM_MODEL})


def cloud_of(model: str | None) -> str | None:
    """The provider a model name belongs to, or None for local and automatic names."""
    if not model:
        return None
    name = model.lower()
    if name.startswith(("gpt-", "dall-e", "chatgpt-", "o1", "o3", "o4")):
        return "openai"
    if name.startswith("gemini-"):
        return "gemini"
    if name.startswith("claude-"):
        return "anthropic"
    return None


def upstreams_serving(clouds: Sequence[UpstreamSettings], task: Task,
                      model: str | None) -> tuple[str, ...]:
    """The upstreams a client asking for ``model`` by name may get, in config order."""
    if not model or model in LOCAL_MODELS or model == AUTO:
        return ()
    return tuple(up.name for up in clouds if up.serves(task, model))


def local_ids(task: Task, aliases: list[str]) -> frozenset[str]:
    """The names the router runs locally as an explicit choice (``auto`` is not one: it
    lets the router decide)."""
    return frozenset({IMAGE_MODEL} if task == "image" else {VLM_MODEL, *aliases})


def chat_names(aliases: list[str]) -> frozenset[str]:
    """The non-cloud names chat accepts."""
    return frozenset({VLM_MODEL, AUTO, *aliases})


def local_chat_model(model: str, aliases: list[str]) -> str:
    """The name the router sees for a chat job: an alias means the local model."""
    return VLM_MODEL if model in aliases else model


def check_image_model(model: str | None, clouds: Sequence[UpstreamSettings] = ()) -> None:
    """Images: a local name, no name, a cloud name or one an upstream serves; else 404."""
    if cloud_of(model) == "anthropic":
        raise bad_request(f"{model} does not make images; ask an image model, or none.",
                          param="model", code="model_not_supported")
    if model not in IMAGE_NAMES and cloud_of(model) is None \
            and not upstreams_serving(clouds, "image", model):
        raise model_not_found(str(model))


def check_chat_model(model: str, aliases: list[str], *, chat_enabled: bool,
                     clouds: Sequence[UpstreamSettings] = ()) -> None:
    """Chat: the VLM, an alias of it, ``auto``, a cloud name or one an upstream serves;
    else 404. The local names are a 404 too while no VLM is enabled (``auto`` is the
    router's to place)."""
    local = chat_names(aliases)
    if model not in local and cloud_of(model) is None \
            and not upstreams_serving(clouds, "vision", model):
        raise model_not_found(model)
    if model in local and not chat_enabled and model != AUTO:
        raise APIError(404, "No vision-language model is enabled on this server.",
                       param="model", code="model_not_found")


def gemini_image_by_name(model: str) -> bool:
    """With no responseModalities, a Gemini request asks for an image by its model name."""
    return model == IMAGE_MODEL or "image" in model


def gemini_job_model(asked: str, image: bool, *, cloud_names: str,
                     vlm_aliases: list[str]) -> str:
    """The model a Gemini request's job carries into the router. ``gemini-*`` names mean
    "a job of this kind" (``cloud_names="route"``: ``auto``) or that cloud
    (``"explicit"``). A local name of the other task is a 400; names no side serves, 404."""
    if asked == (IMAGE_MODEL if image else VLM_MODEL):
        return asked
    if asked == AUTO or (not image and asked in vlm_aliases):
        return asked
    provider = cloud_of(asked)
    if provider == "gemini":
        return asked if cloud_names == "explicit" else AUTO
    if provider is not None:
        return asked  # another cloud's name: explicit, as on the OpenAI endpoints
    if asked in LOCAL_MODELS:
        raise bad_request(f"The model {asked!r} cannot "
                          + ("make images." if image else "answer in text; ask for "
                             "responseModalities [\"IMAGE\"]."), param="model")
    raise APIError(404, f"models/{asked} is not found for API version v1beta/v1, or is not "
                   "supported for generateContent.", type="not_found_error", param="model",
                   code="model_not_found")


@dataclass(frozen=True)
class Listed:
    """One entry of the Gemini model list (protocol_gemini.model_entry renders it)."""

    name: str
    display: str
    description: str
    methods: tuple[str, ...]
    input_limit: int
    output_limit: int


GENERATE = ("generateContent",)
TEXT_METHODS = ("generateContent", "streamGenerateContent")
CLIP_TOKENS = 77  # SDXL's prompt limit


def gemini_listed(settings: Settings, *, images: bool, chat: bool,
                  context: int) -> list[Listed]:
    """What ``client.models.list()`` shows: the local models that are enabled, and the
    Gemini names this box answers (through the router, or Gemini itself if explicit)."""
    cap = settings.vlm.max_tokens_cap
    routed = ("served through Spillway's router: local first, spilled when the queue "
              "would miss the deadline" if settings.router.gemini_names == "route"
              else "sent to Gemini")
    listed = []
    if images:
        listed.append(Listed(IMAGE_MODEL, "SDXL-Turbo (local)",
                             "Text-to-image and image-to-image on this box.", GENERATE,
                             CLIP_TOKENS, 0))
    if chat:
        listed.append(Listed(VLM_MODEL, "Vision-language model (local)",
                             "Image understanding on this box.", TEXT_METHODS, context, cap))
    for name, methods in ((settings.gemini.image_model, GENERATE),
                          (settings.gemini.vision_model, TEXT_METHODS)):
        listed.append(Listed(name, name, f"{name}, {routed}.", methods, context, cap))
    return listed
