"""server/wire/gemini.py: a generateContent request parsed to messages, image sources and
its generationConfig; the response, stream and error bodies (pure, no HTTP)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from pipelines.vlm import ChatResult
from server.catalog import Listed
from server.config import ImageSettings
from server.errors import APIError, bad_request, queue_full
from server.wire.gemini import (
    GeminiAsk,
    GeminiChunks,
    GenerationConfig,
    aspect_of,
    gemini_body,
    images_response,
    model_entry,
    parse_config,
    parse_request,
    size_for,
    text_response,
    wants_image,
)
from server.wire.openai_chat import ImageRef

B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000000Z$")


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "parts": list(parts)}


def ask(*contents: dict[str, Any], **extra: Any) -> GeminiAsk:
    return parse_request({"contents": list(contents), **extra})


def refused(raw: Any) -> APIError:
    with pytest.raises(APIError) as exc:
        parse_request(raw)
    assert exc.value.status == 400
    return exc.value


def config_refused(config: Any) -> APIError:
    return refused({"contents": [user({"text": "hi"})], "generationConfig": config})


def events(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        assert line.startswith("data: ") and line.endswith("\r\n\r\n"), line
        out.append(json.loads(line[len("data: "):-4]))
    return out


# -- contents and parts -----------------------------------------------------------------

def test_text_turns_become_messages_and_model_is_the_assistant() -> None:
    got = ask(user({"text": "hello"}), {"role": "model", "parts": [{"text": "hi"}]},
              {"parts": [{"text": "draw"}, {"text": "a cat"}]})  # no role: user
    assert got.messages == [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": [{"type": "text", "text": "draw"},
                                     {"type": "text", "text": "a cat"}]},
    ]
    assert got.sources == []
    assert got.config == GenerationConfig()
    assert got.prompt == "draw a cat"


def test_inline_and_file_images_become_refs_in_both_spellings() -> None:
    got = ask(user({"text": "compare"},
                   {"inlineData": {"mimeType": "image/png", "data": B64}},
                   {"inline_data": {"mime_type": "image/JPEG", "data": B64}},
                   {"fileData": {"fileUri": "https://example.com/a.webp",
                                 "mimeType": "image/webp"}},
                   {"file_data": {"file_uri": "https://example.com/b.png"}}))
    assert got.messages[0]["content"] == [{"type": "text", "text": "compare"},
                                          *[{"type": "image"}] * 4]
    assert got.sources == [
        ImageRef(f"data:image/png;base64,{B64}", "auto", "contents[0].parts[1].inlineData"),
        ImageRef(f"data:image/JPEG;base64,{B64}", "auto", "contents[0].parts[2].inlineData"),
        ImageRef("https://example.com/a.webp", "auto", "contents[0].parts[3].fileData.fileUri"),
        ImageRef("https://example.com/b.png", "auto", "contents[0].parts[4].fileData.fileUri"),
    ]
    assert got.prompt == "compare"


def test_thought_parts_are_dropped_and_a_thought_signature_is_ignored() -> None:
    got = ask(user({"text": "q"}),
              {"role": "model", "parts": [{"text": "thinking...", "thought": True},
                                          {"text": "answer", "thoughtSignature": "abc"}]},
              user({"text": "next"}))
    assert got.messages[1] == {"role": "assistant",
                               "content": [{"type": "text", "text": "answer"}]}


def test_system_instruction_is_a_leading_system_message() -> None:
    for key in ("systemInstruction", "system_instruction"):
        got = ask(user({"text": "hi"}), **{key: {"parts": [{"text": "be terse"}]}})
        assert got.messages[0] == {"role": "system",
                                   "content": [{"type": "text", "text": "be terse"}]}
        assert got.messages[1]["role"] == "user"
    # a role on it changes nothing, and its text is no prompt
    got = ask(user({"text": "hi"}),
              systemInstruction={"role": "model", "parts": [{"text": "rules"}]})
    assert got.messages[0]["role"] == "system" and got.prompt == "hi"


def test_system_instruction_refuses_images_and_bad_shapes() -> None:
    err = refused({"contents": [user({"text": "hi"})], "systemInstruction": {
        "parts": [{"inlineData": {"mimeType": "image/png", "data": B64}}]}})
    assert err.param == "systemInstruction"
    assert refused({"contents": [user({"text": "hi"})],
                    "systemInstruction": "be terse"}).param == "systemInstruction"
    assert refused({"contents": [user({"text": "hi"})],
                    "systemInstruction": {"parts": []}}).param == "systemInstruction.parts"


@pytest.mark.parametrize(("raw", "param"), [
    ([{"contents": []}], None),  # not an object
    ({}, "contents"),
    ({"contents": []}, "contents"),
    ({"contents": {"role": "user"}}, "contents"),
    ({"contents": ["hi"]}, "contents[0]"),
    ({"contents": [{"role": "system", "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({"contents": [{"role": 1, "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({"contents": [{"role": "user"}]}, "contents[0].parts"),
    ({"contents": [{"role": "user", "parts": {"text": "x"}}]}, "contents[0].parts"),
    ({"contents": [user({"text": "a"}), user("b")]}, "contents[1].parts[0]"),
    ({"contents": [user({"text": 5})]}, "contents[0].parts[0].text"),
    ({"contents": [user({"text": "ok \ud800"})]}, "contents[0].parts[0].text"),
    ({"contents": [user({"text": "a"}, {"functionCall": {"name": "f"}})]},
     "contents[0].parts[1]"),
    ({"contents": [user({})]}, "contents[0].parts[0]"),
    ({"contents": [user({"inlineData": "abc"})]}, "contents[0].parts[0].inlineData"),
    ({"contents": [user({"inlineData": {"mimeType": "image/png"}})]},
     "contents[0].parts[0].inlineData"),
    ({"contents": [user({"inlineData": {"mimeType": "application/pdf", "data": B64}})]},
     "contents[0].parts[0].inlineData.mimeType"),
    ({"contents": [user({"inlineData": {"data": B64}})]},
     "contents[0].parts[0].inlineData.mimeType"),
    ({"contents": [user({"fileData": {"mimeType": "image/png"}})]},
     "contents[0].parts[0].fileData"),
    ({"contents": [user({"text": "a"}), {"role": "model", "parts": [
        {"inlineData": {"mimeType": "image/png", "data": B64}}]}, user({"text": "b"})]},
     "contents[1].parts[0]"),
    ({"contents": [user({"text": "a"}), {"role": "model", "parts": [{"text": "b"}]}]},
     "contents"),
])
def test_bad_requests_are_400s_naming_the_place(raw: Any, param: str | None) -> None:
    assert refused(raw).param == param


def test_messages_say_what_is_wrong() -> None:
    assert "only images" in refused({"contents": [user(
        {"inlineData": {"mimeType": "text/plain", "data": B64}})]}).message
    assert "functionCall" in refused({"contents": [user({"functionCall": {}})]}).message
    assert "empty" in refused({"contents": [user({"thoughtSignature": "x"})]}).message
    assert "surrogate" in refused({"contents": [user({"text": "\udc00"})]}).message
    assert "last content" in refused({"contents": [
        {"role": "model", "parts": [{"text": "b"}]}]}).message


# -- generationConfig -------------------------------------------------------------------

def test_generation_config_in_camel_and_snake_case() -> None:
    camel = parse_config({"maxOutputTokens": 100, "temperature": 0.5, "topP": 0.9,
                          "stopSequences": ["END", "STOP"], "seed": 42, "candidateCount": 3,
                          "responseModalities": ["text", "Image"],
                          "imageConfig": {"aspectRatio": "16:9"}})
    snake = parse_config({"max_output_tokens": 100, "temperature": 0.5, "top_p": 0.9,
                          "stop_sequences": ["END", "STOP"], "seed": 42, "candidate_count": 3,
                          "response_modalities": ["text", "Image"],
                          "image_config": {"aspect_ratio": "16:9"}})
    assert camel == snake == GenerationConfig(
        max_output_tokens=100, temperature=0.5, top_p=0.9, stop=("END", "STOP"), seed=42,
        candidate_count=3, modalities=frozenset({"TEXT", "IMAGE"}), aspect_ratio="16:9")


def test_camel_case_wins_when_both_are_sent() -> None:
    got = parse_config({"maxOutputTokens": 5, "max_output_tokens": 9})
    assert got.max_output_tokens == 5


def test_the_request_carries_its_config() -> None:
    got = ask(user({"text": "hi"}), generation_config={"temperature": 0})
    assert got.config.temperature == 0
    assert ask(user({"text": "hi"}), generationConfig=None).config == GenerationConfig()


def test_seed_may_be_negative_and_wraps_to_32_bits() -> None:
    assert parse_config({"seed": -1}).seed == 2**32 - 1
    assert parse_config({"seed": -(2**31)}).seed == 2**31
    assert parse_config({"seed": 2**32 - 1}).seed == 2**32 - 1
    assert parse_config({}).seed is None


def test_numeric_bounds_that_are_accepted() -> None:
    edge = parse_config({"temperature": 2, "topP": 0, "candidateCount": 8,
                         "maxOutputTokens": 1})
    assert (edge.temperature, edge.top_p, edge.candidate_count, edge.max_output_tokens) == (
        2, 0, 8, 1)
    assert parse_config({"candidateCount": None}).candidate_count == 1


@pytest.mark.parametrize(("config", "name"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"topP": 1.5}, "topP"),
    ({"maxOutputTokens": 0}, "maxOutputTokens"),
    ({"maxOutputTokens": 2**31 + 1}, "maxOutputTokens"),
    ({"maxOutputTokens": 10.0}, "maxOutputTokens"),
    ({"seed": 2**32}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"candidateCount": 0}, "candidateCount"),
    ({"candidateCount": 9}, "candidateCount"),
    ({"candidate_count": False}, "candidateCount"),
])
def test_bad_numbers_are_refused_naming_the_field(config: dict[str, Any], name: str) -> None:
    err = config_refused(config)
    assert err.param is not None and err.param.endswith(name)
    assert name in err.message


def test_numeric_fields_name_their_full_path_like_the_other_fields() -> None:
    assert config_refused({"temperature": 9}).param == "generationConfig.temperature"


@pytest.mark.parametrize(("config", "param"), [
    ("hot", "generationConfig"),
    ([], "generationConfig"),
    ({"stopSequences": "END"}, "generationConfig.stopSequences"),
    ({"stopSequences": ["a", "b", "c", "d", "e", "f"]}, "generationConfig.stopSequences"),
    ({"stopSequences": ["a", ""]}, "generationConfig.stopSequences"),
    ({"stopSequences": [3]}, "generationConfig.stopSequences"),
    ({"stopSequences": ["ok", "\udfff"]}, "generationConfig.stopSequences[1]"),
    ({"responseModalities": "IMAGE"}, "generationConfig.responseModalities"),
    ({"responseModalities": [True]}, "generationConfig.responseModalities"),
    ({"responseModalities": [3]}, "generationConfig.responseModalities"),  # AUDIO, by number
    ({"responseModalities": ["AUDIO"]}, "generationConfig.responseModalities"),
    ({"imageConfig": "16:9"}, "generationConfig.imageConfig"),
    ({"imageConfig": {"aspectRatio": "16x9"}}, "generationConfig.imageConfig.aspectRatio"),
    ({"imageConfig": {"aspectRatio": "9:1"}}, "generationConfig.imageConfig.aspectRatio"),
    ({"imageConfig": {"aspectRatio": 1.5}}, "generationConfig.imageConfig.aspectRatio"),
])
def test_bad_config_shapes_are_refused_at_their_path(config: Any, param: str) -> None:
    assert config_refused(config).param == param


def test_unsupported_modalities_are_named() -> None:
    err = config_refused({"responseModalities": ["TEXT", "audio"]})
    assert "AUDIO" in err.message and "TEXT" not in err.message.split("supported")[0]


def test_five_stop_sequences_are_allowed() -> None:
    assert parse_config({"stopSequences": list("abcde")}).stop == tuple("abcde")
    assert parse_config({"stopSequences": None}).stop == ()


# -- images: wants_image, aspect ratios, sizes -----------------------------------------------

def test_wants_image_by_modalities_else_by_model_name() -> None:
    text_only = GenerationConfig(modalities=frozenset({"TEXT"}))
    both = GenerationConfig(modalities=frozenset({"TEXT", "IMAGE"}))
    assert not wants_image("gemini-2.5-flash-image", text_only)
    assert wants_image("gemini-2.5-flash", both)
    assert wants_image("gemini-2.5-flash-image", GenerationConfig())
    assert wants_image("sdxl-turbo", GenerationConfig())
    assert not wants_image("gemini-2.5-flash", GenerationConfig())
    assert not wants_image("local-vlm", GenerationConfig())


def test_aspect_of() -> None:
    assert aspect_of("16:9") == (16, 9)
    assert aspect_of("1:8") == (1, 8)
    assert aspect_of("64:64") == (64, 64)
    for bad in (None, 16, "", "16", "16:", ":9", "16/9", "0:1", "65:64", "9:1", "-1:1",
                " 1:1", "1.5:1"):
        assert aspect_of(bad) is None, bad


def test_an_aspect_ratio_with_superscript_digits_is_a_400() -> None:
    err = config_refused({"imageConfig": {"aspectRatio": "²:1"}})
    assert err.param == "generationConfig.imageConfig.aspectRatio"


@pytest.mark.parametrize(("aspect", "size"), [
    (None, "512x512"), ("1:1", "512x512"), ("16:9", "704x384"), ("9:16", "384x704"),
    ("4:3", "576x448"), ("3:2", "640x448"),
    ("8:1", "1024x256"), ("1:8", "256x1024"),  # clamped to the side limits
])
def test_size_for_keeps_the_default_area_at_the_asked_aspect(aspect: str | None,
                                                             size: str) -> None:
    assert size_for(aspect, ImageSettings()) == size


def test_size_for_stays_within_the_limits_in_multiples_of_eight() -> None:
    limits = ImageSettings(default_size="1024x1024", min_side=384, max_side=1536)
    assert size_for("16:9", limits) == "1344x768"
    for w in range(1, 9):
        for h in range(1, 9):
            width, height = (int(v) for v in size_for(f"{w}:{h}", limits).split("x"))
            assert 384 <= width <= 1536 and 384 <= height <= 1536
            assert width % 8 == 0 and height % 8 == 0
            if (w > h) != (width > height):
                assert width == height or w == h, (w, h, width, height)


# -- responses ----------------------------------------------------------------------------

def test_text_response_final_and_delta() -> None:
    final = text_response("a cat", "stop", 10, 2, "gemini-2.5-flash", "rid1")
    assert final["candidates"] == [{"content": {"role": "model", "parts": [{"text": "a cat"}]},
                                    "index": 0, "finishReason": "STOP"}]
    assert final["usageMetadata"] == {"promptTokenCount": 10, "candidatesTokenCount": 2,
                                      "totalTokenCount": 12}
    assert final["modelVersion"] == "gemini-2.5-flash" and final["responseId"] == "rid1"
    assert TIME.match(final["createTime"])
    delta = text_response("a", None, 0, 0, "m", "rid1")
    assert "finishReason" not in delta["candidates"][0] and "usageMetadata" not in delta
    assert text_response(None, "length", 1, 1, "m", "r")["candidates"][0] == {
        "content": {"role": "model", "parts": []}, "index": 0, "finishReason": "MAX_TOKENS"}
    assert text_response("", "content_filter", 1, 1, "m", "r")["candidates"][0][
        "finishReason"] == "OTHER"


def test_images_response_one_candidate_per_image_in_standard_base64() -> None:
    data = bytes(range(256))  # standard base64 of this has '+' and '/'
    body = images_response([("image/png", data), ("image/jpeg", b"jpg")], "sdxl-turbo",
                           "rid2", prompt_tokens=4)
    first, second = body["candidates"]
    assert first == {"content": {"role": "model", "parts": [{"inlineData": {
        "mimeType": "image/png", "data": base64.b64encode(data).decode()}}]},
        "finishReason": "STOP", "index": 0}
    assert "+" in first["content"]["parts"][0]["inlineData"]["data"]
    assert second["index"] == 1
    assert base64.b64decode(second["content"]["parts"][0]["inlineData"]["data"]) == b"jpg"
    assert body["usageMetadata"] == {"promptTokenCount": 4, "candidatesTokenCount": 0,
                                     "totalTokenCount": 4}
    assert body["modelVersion"] == "sdxl-turbo" and body["responseId"] == "rid2"


def test_stream_events() -> None:
    s = GeminiChunks("gemini-2.5-flash", "rid3")
    assert s.opening() == [] and s.ending() == []
    d1, d2, last = events([s.delta("a "), s.delta("cat"),
                           *s.closing(ChatResult("a cat", "length", 7, 2))])
    assert [e["candidates"][0]["content"]["parts"] for e in (d1, d2)] == [
        [{"text": "a "}], [{"text": "cat"}]]
    assert all("usageMetadata" not in e and "finishReason" not in e["candidates"][0]
               for e in (d1, d2))
    assert last["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert last["candidates"][0]["content"]["parts"] == [{"text": ""}]
    assert last["usageMetadata"]["totalTokenCount"] == 9
    assert {e["responseId"] for e in (d1, d2, last)} == {"rid3"}
    (err,) = events([s.error(bad_request("nope", param="contents"))])
    assert err["error"]["status"] == "INVALID_ARGUMENT"


def test_model_entry() -> None:
    listed = Listed("sdxl-turbo", "SDXL Turbo", "local images", ("generateContent",), 77, 0)
    assert model_entry(listed) == {
        "name": "models/sdxl-turbo", "baseModelId": "sdxl-turbo", "version": "spillway",
        "displayName": "SDXL Turbo", "description": "local images", "inputTokenLimit": 77,
        "outputTokenLimit": 0, "supportedGenerationMethods": ["generateContent"]}


# -- errors ---------------------------------------------------------------------------------

def test_gemini_body_for_a_bad_request() -> None:
    body = gemini_body(bad_request("contents must be a non-empty list.", param="contents"))
    assert body == {"error": {
        "code": 400, "message": "contents must be a non-empty list.",
        "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": "INVALID_VALUE", "domain": "spillway",
                     "metadata": {"param": "contents"}}]}}


def test_a_429_carries_retry_info_from_its_retry_after() -> None:
    err = queue_full(2.5)
    details = gemini_body(err)["error"]["details"]
    assert gemini_body(err)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert details[0] == {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                          "retryDelay": "3s"}
    assert details[1]["reason"] == "QUEUE_FULL" and details[1]["metadata"] == {}
    # without a Retry-After there is no RetryInfo
    plain = gemini_body(APIError(429, "slow down", type="rate_limit_error"))
    assert plain == {"error": {"code": 429, "message": "slow down",
                               "status": "RESOURCE_EXHAUSTED"}}


@pytest.mark.parametrize(("status", "name"), [
    (401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED"), (404, "NOT_FOUND"),
    (413, "INVALID_ARGUMENT"), (499, "CANCELLED"), (500, "INTERNAL"), (501, "UNIMPLEMENTED"),
    (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED"), (507, "UNAVAILABLE"), (418, "UNKNOWN"),
])
def test_statuses_map_to_google_names(status: int, name: str) -> None:
    body = gemini_body(APIError(status, "x", headers={"Retry-After": "5"}))["error"]
    assert (body["code"], body["status"]) == (status, name)
    assert "details" not in body  # RetryInfo is for 429s only; no code, no ErrorInfo
