"""The Gemini-compatible API: ``POST /{v1beta|v1}/models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse``.

Code written for Gemini runs against the box by changing only the base URL. Requests go
through the same intake (server/media/intake.py), the same router and the same ledger as the
OpenAI endpoints; only the wire format differs (server/wire/gemini.py). Errors are in
Google's shape (server/errors.py picks it by path); the key may come in ``x-goog-api-key``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server import catalog
from server.errors import APIError, bad_request
from server.http.deps import State, deadline_s, json_body
from server.http.routes.chat import run_chat, stream_chat
from server.http.routes.images import run_image_job
from server.job import ChatJob
from server.media import intake
from server.services import AppState
from server.wire.gemini import (
    GeminiAsk,
    GeminiChunks,
    GeminiJsonArray,
    images_response,
    model_entry,
    parse_request,
    response_id,
    size_for,
    text_response,
    wants_image,
)
from server.wire.openai_images import (
    ImageEditRequest,
    ImageGenerationRequest,
)

router = APIRouter()
VERSIONS = ("v1beta", "v1")


async def _ask(request: Request) -> GeminiAsk:
    return parse_request(await json_body(request))


def _model(state: AppState, asked: str, image: bool) -> str:
    return catalog.gemini_job_model(asked, image,
                                    cloud_names=state.settings.router.gemini_names,
                                    vlm_aliases=state.settings.vlm.aliases)


def _validated(model: type[ImageGenerationRequest], **fields: object) -> ImageGenerationRequest:
    """The OpenAI request the Gemini one maps to, checked by the same rules."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise bad_request(f"Invalid {where}: {first.get('msg', 'invalid value')}.",
                          param=where or None) from None


async def _images(request: Request, state: AppState, asked: str, ask: GeminiAsk,
                  endpoint: str) -> Response:
    serving = state.require_serving()
    model = _model(state, asked, image=True)
    catalog.check_image_model(model, state.settings.clouds)
    if not ask.prompt.strip():
        raise bad_request("Image generation needs a text prompt in the last user turn.",
                          param="contents")
    limits, cfg = state.settings.images, ask.config
    size = size_for(cfg.aspect_ratio, limits)
    fields = {"prompt": ask.prompt, "n": cfg.candidate_count, "seed": cfg.seed,
              "response_format": "b64_json", "output_format": "png"}
    if ask.sources:  # image(s) in, image out: an edit of the first source(s)
        intake.check_count(len(ask.sources), state.settings.media, param="contents")
        edit = _validated(ImageEditRequest, **fields,
                          size=size if cfg.aspect_ratio else "auto")
        assert isinstance(edit, ImageEditRequest)
        job = await serving.images.edit_job(edit, [(ref.url, ref.param)
                                                   for ref in ask.sources], model)
    else:
        job = serving.images.generation_job(
            _validated(ImageGenerationRequest, **fields, size=size), model)
    ran = await run_image_job(request, state, endpoint, job, model=asked)
    if ran is None:
        return Response(status_code=499)
    images, served = ran
    body = images_response([(im.media_type, im.data) for im in images], asked, response_id())
    return JSONResponse(body, headers=served.headers())


async def _chat_job(state: AppState, asked: str, ask: GeminiAsk) -> ChatJob:
    chat = state.require_serving().chat
    model = _model(state, asked, image=False)
    chat.check_model(model)
    intake.check_count(len(ask.sources), state.settings.media, param="contents")
    cfg, vlm = ask.config, state.settings.vlm
    if cfg.candidate_count > 1:
        raise bad_request("candidateCount above 1 is supported for images only.",
                          param="generationConfig.candidateCount")
    max_tokens = cfg.max_output_tokens or vlm.default_max_tokens
    if max_tokens > vlm.max_tokens_cap:
        raise bad_request(f"maxOutputTokens is {max_tokens}; this server allows at most "
                          f"{vlm.max_tokens_cap}.", param="generationConfig.maxOutputTokens")
    images = await chat.load_images(ask.sources)
    return ChatJob(messages=ask.messages, images=images, max_tokens=max_tokens,
                   temperature=1.0 if cfg.temperature is None else cfg.temperature,
                   top_p=1.0 if cfg.top_p is None else cfg.top_p, stop=cfg.stop,
                   seed=cfg.seed, model=model)


async def _text(request: Request, state: AppState, asked: str, ask: GeminiAsk,
                endpoint: str) -> Response:
    job = await _chat_job(state, asked, ask)
    ran = await run_chat(request, state.require_serving(), endpoint, asked, job,
                         deadline_s(request, state))
    if ran is None:
        return Response(status_code=499)
    out, served = ran
    body = text_response(out.text, out.finish_reason, out.prompt_tokens,
                         out.completion_tokens, asked, response_id())
    return JSONResponse(body, headers=served.headers())


async def _stream(request: Request, state: AppState, asked: str, ask: GeminiAsk,
                  endpoint: str, *, sse: bool) -> Response:
    job = await _chat_job(state, asked, ask)
    fmt = (GeminiChunks if sse else GeminiJsonArray)(asked, response_id())
    return await stream_chat(request, state.require_serving(), endpoint, asked, job, fmt,
                             deadline_s(request, state))


def gemini_models(state: AppState) -> list[dict[str, Any]]:
    """What ``client.models.list()`` shows (server/catalog.py says which)."""
    cap = state.settings.vlm.max_tokens_cap
    context = state.chat.context_length if state.chat is not None else cap
    return [model_entry(m) for m in catalog.gemini_listed(
        state.settings, images=state.images_enabled, chat=state.chat_enabled,
        context=context)]


def gemini_model(state: AppState, name: str) -> dict[str, Any]:
    name = name.removeprefix("models/")
    for model in gemini_models(state):
        if model["name"] == f"models/{name}":
            return model
    raise APIError(404, f"models/{name} is not found.", type="not_found_error",
                   param="model", code="model_not_found")


@router.get("/v1beta/models")
async def list_models_v1beta(state: State) -> dict[str, Any]:
    return {"models": gemini_models(state)}


@router.get("/v1beta/models/{model}")
async def get_model_v1beta(model: str, state: State) -> dict[str, Any]:
    return gemini_model(state, model)


def _endpoint(version: str, method: str) -> str:
    return f"/{version}/models/{{model}}:{method}"


async def other_method(model: str, method: str) -> Response:
    """embedContent...: a clear 404 in Google's shape, not the 405 of the models.get route
    that the path would otherwise fall to."""
    raise APIError(404, f"Method {method[:40]!r} is not served here: this server answers "
                   "generateContent, streamGenerateContent and countTokens.",
                   type="not_found_error", param="method", code="method_not_found")


async def count_tokens(model: str, request: Request, state: State) -> dict[str, Any]:
    """``countTokens`` for a text model: the prompt's tokens as the local VLM counts them
    (its tokenizer and image processor), whichever model name was asked (the router may
    send the request elsewhere, but this is the count it is admitted by)."""
    raw = await json_body(request)
    if isinstance(raw, dict) and isinstance(raw.get("generateContentRequest"), dict):
        raw = raw["generateContentRequest"]  # the other spelling of the same request
    ask = parse_request(raw)
    if wants_image(model, ask.config):
        raise bad_request("countTokens counts text prompts; image models are not counted.",
                          param="model")
    local = state.chat
    if local is None:
        raise APIError(503 if state.chat_enabled else 400,
                       "countTokens needs the local vision-language model"
                       + (", which is still loading." if state.chat_enabled
                          else ", which is not enabled on this server."), param="model",
                       code="model_not_ready" if state.chat_enabled else "unsupported_value")
    job = await _chat_job(state, model, ask)
    return {"totalTokens": await asyncio.to_thread(local.count_tokens, job)}


def _add(version: str) -> None:
    generate = _endpoint(version, "generateContent")
    stream = _endpoint(version, "streamGenerateContent")

    async def generate_content(model: str, request: Request, state: State) -> Response:
        ask = await _ask(request)
        if wants_image(model, ask.config):
            return await _images(request, state, model, ask, generate)
        return await _text(request, state, model, ask, generate)

    async def stream_generate_content(model: str, request: Request, state: State) -> Response:
        # alt=sse: server-sent events (google-genai); none, alt=json or Google's $alt=json
        # (older SDKs over REST): one JSON array, sent as it comes.
        query = request.query_params
        alt = (query.get("alt") or query.get("$alt") or "json").split(";")[0].strip()
        if alt not in ("sse", "json"):
            raise bad_request(f"alt={alt[:20]!r} is not served: use sse or json.", param="alt")
        ask = await _ask(request)
        if wants_image(model, ask.config):
            raise bad_request("Streaming is for text; ask for images with generateContent.",
                              param="generationConfig.responseModalities")
        return await _stream(request, state, model, ask, stream, sse=alt == "sse")

    router.add_api_route(generate, generate_content, methods=["POST"],
                         name=f"gemini_generate_{version}")
    router.add_api_route(stream, stream_generate_content, methods=["POST"],
                         name=f"gemini_stream_{version}")
    router.add_api_route(_endpoint(version, "countTokens"), count_tokens, methods=["POST"],
                         name=f"gemini_count_tokens_{version}")
    router.add_api_route(_endpoint(version, "{method}"), other_method, methods=["POST"],
                         include_in_schema=False)


for _version in VERSIONS:
    _add(_version)
