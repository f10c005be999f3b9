"""server/wire/openai_chat.py: chat messages to the HF chat form, the sampling fields, the
response body and the streamed ``chat.completion.chunk`` events (pure, no HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipelines.vlm import ChatResult
from server.errors import APIError, queue_full
from server.wire.openai_chat import (
    ChatRequest,
    ImageRef,
    OpenAIChunks,
    completion_body,
    completion_id,
    max_tokens_of,
    parse_messages,
    stop_strings,
    text_value,
    usage,
)

RESULT = ChatResult(text="a red square", finish_reason="length", prompt_tokens=12,
                    completion_tokens=3)
PNG = "data:image/png;base64,iVBORw0KGgo="


def refused(raw: list[dict[str, Any]]) -> APIError:
    with pytest.raises(APIError) as exc:
        parse_messages(raw)
    assert exc.value.status == 400
    return exc.value


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "local-vlm",
                                       "messages": [{"role": "user", "content": "hi"}],
                                       **fields})


def events(lines: list[str]) -> list[Any]:
    """The JSON of each ``data:`` event (``[DONE]`` kept as the string)."""
    out: list[Any] = []
    for line in lines:
        assert line.startswith("data: ") and line.endswith("\n\n"), line
        payload = line[len("data: "):-2]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# -- parse_messages ------------------------------------------------------------------------

def test_string_contents_become_text_parts_and_developer_is_a_system_turn() -> None:
    parsed = parse_messages([
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "no emoji"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
    ])
    assert parsed.messages == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "system", "content": [{"type": "text", "text": "no emoji"}]},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert parsed.images == []


def test_an_assistant_turn_without_content_is_empty_text() -> None:
    parsed = parse_messages([{"role": "user", "content": "q"},
                             {"role": "assistant", "content": None},
                             {"role": "user", "content": "again"}])
    assert parsed.messages[1] == {"role": "assistant",
                                  "content": [{"type": "text", "text": ""}]}


def test_a_user_turn_without_content_is_refused() -> None:
    err = refused([{"role": "user", "content": None}])
    assert err.param == "messages[0].content"


def test_image_parts_become_image_placeholders_with_their_refs_in_order() -> None:
    parsed = parse_messages([
        {"role": "system", "content": "look"},
        {"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png",
                                                "detail": "low"}},
            {"type": "image_url", "image_url": PNG},  # the bare-string form
            {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
            {"type": "image_url", "image_url": {"url": PNG, "detail": None}},
        ]},
    ])
    assert parsed.messages[1] == {"role": "user", "content": [
        {"type": "text", "text": "compare"}, {"type": "image"}, {"type": "image"},
        {"type": "image"}, {"type": "image"}]}
    assert parsed.images == [
        ImageRef("https://example.com/a.png", "low", "messages[1].content[1].image_url"),
        ImageRef(PNG, "auto", "messages[1].content[2].image_url"),
        ImageRef(PNG, "high", "messages[1].content[3].image_url"),
        ImageRef(PNG, "auto", "messages[1].content[4].image_url"),
    ]


@pytest.mark.parametrize("role", ["tool", "function", None, 3])
def test_unknown_roles_are_refused_naming_the_role(role: Any) -> None:
    err = refused([{"role": "user", "content": "a"}, {"role": role, "content": "b"}])
    assert err.param == "messages[1].role"
    assert "Unsupported role" in err.message and str(role) in err.message


@pytest.mark.parametrize("content", [[], 7, {"type": "text", "text": "x"}])
def test_content_must_be_a_string_or_a_non_empty_list(content: Any) -> None:
    err = refused([{"role": "user", "content": content}])
    assert err.param == "messages[0].content"


def test_images_only_in_user_turns() -> None:
    err = refused([{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": PNG}}]}, {"role": "user", "content": "x"}])
    assert err.param == "messages[0].content[0].type"
    assert "'assistant'" in err.message


@pytest.mark.parametrize("part", [{"type": "input_audio"}, {"text": "no type"}, "text"])
def test_unknown_part_types_are_refused_at_the_part(part: Any) -> None:
    err = refused([{"role": "user", "content": [{"type": "text", "text": "ok"}, part]}])
    assert err.param == "messages[0].content[1].type"


@pytest.mark.parametrize("spec", [None, "", {}, {"url": ""}, {"url": 5}, ["x"]])
def test_an_image_part_needs_a_url(spec: Any) -> None:
    err = refused([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "image_url", "image_url": spec}]}])
    assert err.param == "messages[0].content[1].image_url"
    assert "image_url.url" in err.message


def test_an_unknown_detail_is_refused_at_the_detail() -> None:
    err = refused([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG, "detail": "ultra"}}]}])
    assert err.param == "messages[0].content[0].image_url.detail"
    assert "'ultra'" in err.message and "low, high, auto" in err.message


@pytest.mark.parametrize("text", [None, 3, ["a"]])
def test_a_text_part_needs_a_string(text: Any) -> None:
    err = refused([{"role": "user", "content": [{"type": "text", "text": text}]}])
    assert err.param == "messages[0].content[0]"
    assert "string 'text'" in err.message


def test_a_lone_surrogate_is_a_400_naming_where_it_is() -> None:
    err = refused([{"role": "user", "content": "ok"},
                   {"role": "user", "content": [{"type": "text", "text": "ab\ud800c"}]}])
    assert err.param == "messages[1].content[0]"
    assert "\\ud800" in err.message and "character 2" in err.message
    err = refused([{"role": "system", "content": "\udfff"}])
    assert err.param == "messages[0].content"


def test_text_value_passes_real_text_through_and_refuses_non_strings() -> None:
    assert text_value("héllo 🌍", "p") == "héllo 🌍"
    with pytest.raises(APIError) as exc:
        text_value(b"bytes", "stop[0]", need="stop must be a string.")
    assert (exc.value.status, exc.value.param, exc.value.message) == (
        400, "stop[0]", "stop must be a string.")


# -- sampling fields ---------------------------------------------------------------------

def test_stop_strings() -> None:
    assert stop_strings(None) == ()
    assert stop_strings("END") == ("END",)
    assert stop_strings(["a", "b", "c", "d"]) == ("a", "b", "c", "d")
    for bad in (["a", "b", "c", "d", "e"], ["a", ""], ""):
        with pytest.raises(APIError) as exc:
            stop_strings(bad)
        assert exc.value.status == 400 and exc.value.param == "stop"


def test_max_tokens_prefers_max_completion_tokens_then_max_tokens_then_the_default() -> None:
    assert max_tokens_of(request(), 512, 4096) == 512
    assert max_tokens_of(request(max_tokens=100), 512, 4096) == 100
    assert max_tokens_of(request(max_tokens=100, max_completion_tokens=50), 512, 4096) == 50
    assert max_tokens_of(request(max_completion_tokens=4096), 512, 4096) == 4096


def test_max_tokens_above_the_cap_is_refused_naming_the_field_that_was_sent() -> None:
    with pytest.raises(APIError) as exc:
        max_tokens_of(request(max_tokens=5000), 512, 4096)
    assert (exc.value.status, exc.value.param) == (400, "max_tokens")
    assert "5000" in exc.value.message and "4096" in exc.value.message
    with pytest.raises(APIError) as exc:
        max_tokens_of(request(max_tokens=10, max_completion_tokens=5000), 512, 4096)
    assert exc.value.param == "max_completion_tokens"
    # a default above the cap is refused too (the operator's settings disagree)
    with pytest.raises(APIError):
        max_tokens_of(request(), 8192, 4096)


# -- responses ---------------------------------------------------------------------------

def test_usage_and_completion_body() -> None:
    assert usage(RESULT) == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    cid = completion_id()
    assert cid.startswith("chatcmpl-") and cid != completion_id()
    body = completion_body(cid, "local-vlm", RESULT)
    assert body["id"] == cid and body["object"] == "chat.completion"
    assert body["model"] == "local-vlm" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0,
                                "message": {"role": "assistant", "content": "a red square",
                                            "refusal": None},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["total_tokens"] == 15
    json.dumps(body)  # serializable as it is


def test_stream_without_usage() -> None:
    s = OpenAIChunks("chatcmpl-1", "local-vlm", include_usage=False)
    lines = [*s.opening(), s.delta("a red"), s.delta(" square"), *s.closing(RESULT),
             *s.ending()]
    opening, d1, d2, close, done = events(lines)
    for chunk in (opening, d1, d2, close):
        assert chunk["id"] == "chatcmpl-1" and chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "local-vlm" and chunk["created"] == s.created
        assert "usage" not in chunk
    assert opening["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]
    assert [d["choices"][0]["delta"] for d in (d1, d2)] == [{"content": "a red"},
                                                            {"content": " square"}]
    assert d1["choices"][0]["finish_reason"] is None
    assert close["choices"][0]["delta"] == {}
    assert close["choices"][0]["finish_reason"] == "length"
    assert done == "[DONE]"


def test_stream_with_usage_ends_with_a_usage_chunk_before_done() -> None:
    s = OpenAIChunks("chatcmpl-2", "m", include_usage=True)
    lines = [*s.opening(), s.delta("x"), *s.closing(RESULT), *s.ending()]
    opening, delta, close, usage_chunk, done = events(lines)
    # every content chunk says usage: null, as OpenAI's do when usage was asked for
    for chunk in (opening, delta, close):
        assert "usage" in chunk and chunk["usage"] is None
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 12, "completion_tokens": 3,
                                    "total_tokens": 15}
    assert usage_chunk["id"] == "chatcmpl-2" and usage_chunk["created"] == s.created
    assert done == "[DONE]"


def test_stream_error_event_is_the_error_body() -> None:
    s = OpenAIChunks("chatcmpl-3", "m", include_usage=False)
    (event,) = events([s.error(queue_full(3.0))])
    assert event == {"error": {"message": queue_full(3.0).message, "type": "rate_limit_error",
                               "param": None, "code": "queue_full"}}
    # the chunks are compact JSON, one line each
    assert "\n" not in s.delta("multi\nline").removesuffix("\n\n")
