"""server/batches/validate.py: one batch input line checked as its endpoint would check it
(short of fetching images), through a real ``Serving`` on an in-memory ledger."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from server.batches.store import CHAT, EDITS, GENERATIONS, MAX_CUSTOM_ID, PENDING, BatchRow
from server.batches.validate import (
    Reject,
    check_body,
    check_line,
    edit_refs,
    item_seed,
    typed,
)
from server.config import MediaSettings, Settings
from server.errors import APIError
from server.routing.dispatch import Dispatcher
from server.serving import Serving
from server.store.ledger import Ledger
from server.store.quotas import Quotas
from server.wire.openai_chat import ChatRequest
from server.wire.openai_images import MAX_SEED, ImageEditRequest, ImageGenerationRequest

PNG = "data:image/png;base64,iVBORw0KGgo="
CHAT_BODY = {"model": "local-vlm", "messages": [{"role": "user", "content": "hi"}]}
GEN_BODY = {"prompt": "a red square", "size": "512x512"}
EDIT_BODY = {"prompt": "make it blue", "images": [{"image_url": PNG}]}
BODIES = {CHAT: CHAT_BODY, GENERATIONS: GEN_BODY, EDITS: EDIT_BODY}


@pytest.fixture(scope="module")
def serving() -> Iterator[Serving]:
    settings = Settings()
    ledger = Ledger("sqlite://")
    yield Serving.build(settings, Dispatcher(settings, {}, None), Quotas(ledger), None,
                        chat_enabled=True)
    ledger.engine.dispose()


def batch(endpoint: str = GENERATIONS, batch_id: str = "batch_abc") -> BatchRow:
    return BatchRow(id=batch_id, endpoint=endpoint, input_file_id="file-1",
                    completion_window="24h", status="validating")


def line(custom_id: Any = "req-1", method: Any = "POST", url: Any = GENERATIONS,
         body: Any = None, **extra: Any) -> bytes:
    obj: dict[str, Any] = {"custom_id": custom_id, "method": method, "url": url,
                           "body": dict(GEN_BODY) if body is None else body, **extra}
    return json.dumps(obj).encode()


def rejected(raw: bytes, b: BatchRow | None = None, serving: Serving | None = None,
             seen: dict[str, int] | None = None) -> Reject:
    assert serving is not None
    with pytest.raises(Reject) as exc:
        check_line(3, raw, b or batch(), {} if seen is None else seen, serving)
    return exc.value


# -- item_seed ------------------------------------------------------------------------------

def test_item_seed_is_deterministic_within_range_and_per_item() -> None:
    seed = item_seed("batch_abc", "req-1")
    assert seed == item_seed("batch_abc", "req-1")
    assert 0 <= seed <= MAX_SEED
    seeds = {item_seed("batch_abc", f"req-{i}") for i in range(200)}
    assert len(seeds) == 200
    assert item_seed("batch_xyz", "req-1") != seed
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert item_seed("ab", "c") != item_seed("a", "bc")


# -- typed and edit_refs ------------------------------------------------------------------------

def test_typed_parses_each_endpoints_body() -> None:
    media = MediaSettings()
    chat = typed(CHAT, CHAT_BODY, media)
    assert isinstance(chat.chat, ChatRequest) and chat.image is None and chat.sources == []
    assert chat.chat.model == "local-vlm"
    gen = typed(GENERATIONS, GEN_BODY, media)
    assert type(gen.image) is ImageGenerationRequest and gen.chat is None
    assert gen.image.prompt == "a red square" and gen.image.size == "512x512"
    edit = typed(EDITS, {**EDIT_BODY, "images": [{"image_url": PNG},
                                                 {"image_url": "https://example.com/b.png"}],
                         "strength": 0.5}, media)
    assert isinstance(edit.image, ImageEditRequest) and edit.image.strength == 0.5
    assert edit.sources == [PNG, "https://example.com/b.png"]


def test_typed_takes_a_mask_and_leaves_the_body_alone() -> None:
    body = {**EDIT_BODY, "mask": {"image_url": PNG}}
    edit = typed(EDITS, body, MediaSettings())
    assert edit.mask == PNG and edit.sources == [PNG]
    assert "images" in body and "mask" in body  # the caller's body is not consumed
    with pytest.raises(APIError) as exc:
        typed(EDITS, {**EDIT_BODY, "mask": PNG}, MediaSettings())
    assert (exc.value.status, exc.value.param) == (400, "mask")


@pytest.mark.parametrize("raw", [None, [], "data:image/png;base64,xx", [PNG],
                                 [{"url": PNG}], [{"image_url": 5}], [{"image_url": PNG}, 1]])
def test_edit_refs_needs_a_list_of_image_urls(raw: Any) -> None:
    with pytest.raises(APIError) as exc:
        edit_refs(raw, MediaSettings())
    assert (exc.value.status, exc.value.param) == (400, "images")


def test_edit_refs_counts_against_the_image_limit() -> None:
    media = MediaSettings(max_images_per_request=2)
    assert edit_refs([{"image_url": "a"}, {"image_url": "b"}], media) == ["a", "b"]
    with pytest.raises(APIError) as exc:
        edit_refs([{"image_url": "a"}] * 3, media)
    assert (exc.value.param, exc.value.code) == ("images", "too_many_images")


# -- check_body -------------------------------------------------------------------------------

def test_an_image_body_without_a_seed_gets_the_items_seed(serving: Serving) -> None:
    body = dict(GEN_BODY)
    out = check_body(GENERATIONS, body, "batch_abc", "req-1", serving)
    assert out == {**GEN_BODY, "seed": item_seed("batch_abc", "req-1")}
    assert "seed" not in body  # a new dict, not the caller's
    assert check_body(GENERATIONS, {**GEN_BODY, "seed": None}, "b", "c", serving)[
        "seed"] == item_seed("b", "c")
    assert check_body(GENERATIONS, {**GEN_BODY, "seed": 5}, "b", "c", serving)["seed"] == 5
    edit = check_body(EDITS, dict(EDIT_BODY), "batch_abc", "req-2", serving)
    assert edit["seed"] == item_seed("batch_abc", "req-2")
    assert edit["images"] == EDIT_BODY["images"]


def test_a_chat_body_comes_back_as_it_was(serving: Serving) -> None:
    body = {**CHAT_BODY, "max_tokens": 10}
    assert check_body(CHAT, body, "b", "c", serving) == body
    assert "seed" not in check_body(CHAT, body, "b", "c", serving)


@pytest.mark.parametrize(("endpoint", "body", "param", "code"), [
    (GENERATIONS, {**GEN_BODY, "size": "500x500"}, "size", "invalid_value"),
    (GENERATIONS, {**GEN_BODY, "model": "flux-9"}, "model", "model_not_found"),
    (EDITS, {**EDIT_BODY, "size": "4096x4096"}, "size", "invalid_value"),
    (EDITS, {**EDIT_BODY, "model": "flux-9"}, "model", "model_not_found"),
    (EDITS, {"prompt": "x"}, "images", "invalid_value"),
    (CHAT, {**CHAT_BODY, "stream": True}, "stream", "unsupported_value"),
    (CHAT, {**CHAT_BODY, "model": "llama-9"}, "model", "model_not_found"),
    (CHAT, {**CHAT_BODY, "max_tokens": 10**6}, "max_tokens", "invalid_value"),
    (CHAT, {**CHAT_BODY, "stop": ["a"] * 5}, "stop", "invalid_value"),
    (CHAT, {"model": "local-vlm", "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].role", "invalid_value"),
    (CHAT, {"model": "local-vlm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG}}] * 9}]}, "messages",
     "too_many_images"),
])
def test_check_body_applies_the_endpoints_own_checks(serving: Serving, endpoint: str,
                                                     body: dict[str, Any], param: str,
                                                     code: str) -> None:
    with pytest.raises(APIError) as exc:
        check_body(endpoint, body, "b", "c", serving)
    assert (exc.value.param, exc.value.code) == (param, code)
    assert exc.value.status in (400, 404)


# -- check_line ---------------------------------------------------------------------------------

def test_a_good_image_line_becomes_a_pending_item_with_a_seed(serving: Serving) -> None:
    seen: dict[str, int] = {}
    got = check_line(7, line(), batch(), seen, serving)
    assert got["line_id"].startswith("batch_req_")
    assert {k: v for k, v in got.items() if k != "line_id"} == {
        "batch_id": "batch_abc", "line": 7, "custom_id": "req-1", "method": "POST",
        "url": GENERATIONS, "body": {**GEN_BODY, "seed": item_seed("batch_abc", "req-1")},
        "state": PENDING, "attempts": 0, "not_before": 0.0}
    assert seen == {"req-1": 7}
    other = check_line(8, line("req-2"), batch(), seen, serving)
    assert other["line_id"] != got["line_id"]


def test_a_good_chat_line(serving: Serving) -> None:
    got = check_line(1, line(url=CHAT, body=CHAT_BODY), batch(CHAT), {}, serving)
    assert (got["url"], got["body"], got["state"]) == (CHAT, CHAT_BODY, PENDING)


@pytest.mark.parametrize(("raw", "code", "says"), [
    (b"{nope", "invalid_json_line", "not valid"),
    (b'{"custom_id": "a", "body": {"prompt": "\\ud800"}}', "invalid_json_line", "surrogate"),
    (b"[1, 2]", "invalid_json_line", "JSON object"),
    (b'"text"', "invalid_json_line", "JSON object"),
    (b"null", "invalid_json_line", "JSON object"),
])
def test_lines_that_are_not_json_objects(serving: Serving, raw: bytes, code: str,
                                         says: str) -> None:
    bad = rejected(raw, serving=serving)
    assert bad.code == code and says in bad.message and bad.custom_id is None


@pytest.mark.parametrize("custom_id", [None, "", 5, ["a"]])
def test_a_line_needs_a_custom_id(serving: Serving, custom_id: Any) -> None:
    bad = rejected(line(custom_id), serving=serving)
    assert bad.code == "missing_custom_id" and "custom_id" in bad.message
    assert bad.custom_id == (custom_id if isinstance(custom_id, str) else None)
    raw = json.dumps({"method": "POST", "url": GENERATIONS, "body": GEN_BODY}).encode()
    assert rejected(raw, serving=serving).code == "missing_custom_id"


def test_a_custom_id_has_a_length_limit(serving: Serving) -> None:
    assert check_line(1, line("x" * MAX_CUSTOM_ID), batch(), {}, serving)["custom_id"] == (
        "x" * MAX_CUSTOM_ID)
    bad = rejected(line("x" * (MAX_CUSTOM_ID + 1)), serving=serving)
    assert bad.code == "invalid_custom_id" and str(MAX_CUSTOM_ID) in bad.message


def test_a_custom_id_may_be_used_once(serving: Serving) -> None:
    seen: dict[str, int] = {}
    check_line(2, line("dup"), batch(), seen, serving)
    bad = rejected(line("dup"), seen=seen, serving=serving)
    assert (bad.code, bad.custom_id) == ("duplicate_custom_id", "dup")
    assert "'dup'" in bad.message and "line 2" in bad.message


@pytest.mark.parametrize("method", ["GET", "post", None])
def test_the_method_must_be_post(serving: Serving, method: Any) -> None:
    bad = rejected(line(method=method), serving=serving)
    assert (bad.code, bad.custom_id) == ("invalid_method", "req-1")
    assert repr(str(method)) in bad.message


@pytest.mark.parametrize("url", [CHAT, "/v1/images/generations/", None])
def test_the_url_must_be_the_batchs_endpoint(serving: Serving, url: Any) -> None:
    bad = rejected(line(url=url), serving=serving)
    assert (bad.code, bad.custom_id) == ("invalid_url", "req-1")
    assert repr(GENERATIONS) in bad.message


@pytest.mark.parametrize("body", [[GEN_BODY], "prompt=x", 3])
def test_the_body_must_be_an_object(serving: Serving, body: Any) -> None:
    bad = rejected(line(body=body), serving=serving)
    assert (bad.code, bad.custom_id) == ("invalid_body", "req-1")
    raw = json.dumps({"custom_id": "r", "method": "POST", "url": GENERATIONS}).encode()
    assert rejected(raw, serving=serving).code == "invalid_body"


@pytest.mark.parametrize(("endpoint", "body", "code", "says"), [
    (GENERATIONS, {"prompt": ""}, "invalid_value", "'prompt'"),
    (GENERATIONS, {**GEN_BODY, "n": 11}, "invalid_value", "'n'"),
    (GENERATIONS, {**GEN_BODY, "size": "500x500"}, "invalid_value", "500x500"),
    (GENERATIONS, {**GEN_BODY, "model": "flux-9"}, "model_not_found", "flux-9"),
    (CHAT, {"model": "local-vlm", "messages": []}, "invalid_value", "'messages'"),
    (CHAT, {**CHAT_BODY, "temperature": 3}, "invalid_value", "'temperature'"),
    (CHAT, {**CHAT_BODY, "stream": True}, "unsupported_value", "stream"),
    (EDITS, {**EDIT_BODY, "mask": [PNG]}, "invalid_value", "mask must be"),
    (EDITS, {**EDIT_BODY, "strength": 0.1}, "invalid_value", "'strength'"),
    (GENERATIONS, {**GEN_BODY, "stream": True}, "unsupported_value", "stream"),
])
def test_a_bad_field_is_that_lines_reject(serving: Serving, endpoint: str,
                                          body: dict[str, Any], code: str, says: str) -> None:
    bad = rejected(line(url=endpoint, body=body), batch(endpoint), serving=serving)
    assert (bad.code, bad.custom_id) == (code, "req-1")
    assert says in bad.message, bad.message


def test_a_rejected_line_still_claims_its_custom_id(serving: Serving) -> None:
    # custom_ids are unique over the whole input file, good lines or not
    seen: dict[str, int] = {}
    rejected(line("r", method="GET"), seen=seen, serving=serving)
    assert rejected(line("r"), seen=seen, serving=serving).code == "duplicate_custom_id"
