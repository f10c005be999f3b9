"""Hostile input at every edge parser, over real HTTP: no request gets a 5xx (or a reset
connection), and every refusal has the error shape of its API (OpenAI's, Google's on the
Gemini paths).

Each JSON endpoint gets its valid body with one field (top-level or nested) replaced by
each hostile value, written as raw JSON text: lone surrogates, nesting past any limit,
numbers past every range, NaN/Infinity literals, wrong types. Then whole bodies that are
not objects, multipart forms with broken fields, and query, path and header values.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server.app import create_app
from server.config import Settings
from server.http.errors import is_gemini_path
from tests.conftest import serve

DEEP = 100_000
# Raw JSON texts: what a client can send that json.dumps never writes.
VALUES = {
    "surrogate": '"\\ud800"',
    "surrogate-in-text": '"a cat \\udfff"',
    "surrogate-key": '{"\\ud800": 1}',
    "deep-list": "[" * DEEP + "]" * DEEP,
    "deep-object": '{"a":' * DEEP + "1" + "}" * DEEP,
    "deep-under-recursion-limit": "[" * 500 + "]" * 500,
    "1e400": "1e400",
    "-1e20": "-1e20",
    "2**70": str(2**70),
    "-2**70": str(-(2**70)),
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "list": "[1, 2]",
    "object": '{"x": 1}',
    "true": "true",
    "null": "null",
    "empty-string": '""',
    "long-string": json.dumps("x" * 50_000),
}
BODIES = {
    "empty": b"",
    "null": b"null",
    "list": b"[]",
    "string": b'"x"',
    "number": b"1e400",
    "NaN": b"NaN",
    "truncated": b'{"prompt": "a',
    "not-utf8": b'{"prompt": "\xff\xfe"}',
    "surrogate-key": b'{"\\ud800": 1}',
    "deep-list": VALUES["deep-list"].encode(),
    "deep-object": VALUES["deep-object"].encode(),
}
# Query, path and header values (already URL-encoded where they go in a URL).
QUERY = ["inf", "-inf", "nan", "1e400", "-1e20", str(2**70), "-1", "0", "",
         "%ED%A0%80", "%FF", "%00", "9999-12-31T23:59:59-23:59",
         "0001-01-01T00:00:00%2B23:59", "x" * 5000]
HEADER = ["NaN", "nan", "inf", "-inf", "1e400", "-1e20", str(2**70), "", "-1", "0x10",
          "\xff\xfe", "1" * 5000]
_RAW = "@@raw@@"


def png_url(size: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = png_url()
CHAT: dict[str, Any] = {"model": "local-vlm", "max_tokens": 1, "messages": [
    {"role": "user", "content": [{"type": "text", "text": "hi"},
                                 {"type": "image_url", "image_url": {"url": IMAGE}}]}]}
GENERATE: dict[str, Any] = {"prompt": "a cat", "size": "64x64", "n": 1,
                            "response_format": "b64_json"}
EDIT: dict[str, Any] = {"prompt": "a cat", "size": "64x64",
                        "images": [{"image_url": IMAGE}]}
BATCH: dict[str, Any] = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                         "completion_window": "24h", "metadata": {"a": "b"}}
GEMINI: dict[str, Any] = {
    "contents": [{"role": "user", "parts": [
        {"text": "hi"}, {"inlineData": {"mimeType": "image/png",
                                        "data": IMAGE.split(",", 1)[1]}}]}],
    "generationConfig": {"maxOutputTokens": 1}}

# endpoint -> (valid body, the paths (keys, list indexes) of the values to replace)
JSON_ENDPOINTS: dict[str, tuple[dict[str, Any], list[tuple[str | int, ...]]]] = {
    "/v1/images/generations": (GENERATE, [
        ("prompt",), ("size",), ("n",), ("model",), ("quality",), ("seed",), ("steps",),
        ("user",), ("response_format",), ("output_format",), ("output_compression",),
        ("background",), ("stream",)]),
    "/v1/images/edits": (EDIT, [
        ("prompt",), ("size",), ("n",), ("strength",), ("seed",), ("model",), ("user",),
        ("images",), ("images", 0), ("images", 0, "image_url"), ("mask",)]),
    "/v1/chat/completions": (CHAT, [
        ("model",), ("messages",), ("max_tokens",), ("max_completion_tokens",),
        ("temperature",), ("top_p",), ("stop",), ("seed",), ("n",), ("stream",),
        ("stream_options",), ("user",), ("messages", 0), ("messages", 0, "role"),
        ("messages", 0, "content"), ("messages", 0, "content", 0, "text"),
        ("messages", 0, "content", 1, "image_url"),
        ("messages", 0, "content", 1, "image_url", "url"),
        ("messages", 0, "content", 1, "image_url", "detail")]),
    "/v1/batches": (BATCH, [
        ("input_file_id",), ("endpoint",), ("completion_window",), ("metadata",),
        ("metadata", "a")]),
    "/v1beta/models/local-vlm:generateContent": (GEMINI, [
        ("contents",), ("generationConfig",), ("systemInstruction",),
        ("contents", 0), ("contents", 0, "role"), ("contents", 0, "parts"),
        ("contents", 0, "parts", 0, "text"), ("contents", 0, "parts", 1, "inlineData"),
        ("contents", 0, "parts", 1, "inlineData", "data"),
        ("contents", 0, "parts", 1, "inlineData", "mimeType"),
        ("generationConfig", "maxOutputTokens"), ("generationConfig", "temperature"),
        ("generationConfig", "topP"), ("generationConfig", "seed"),
        ("generationConfig", "candidateCount"), ("generationConfig", "stopSequences"),
        ("generationConfig", "responseModalities"), ("generationConfig", "imageConfig")]),
    "/v1beta/models/local-vlm:streamGenerateContent?alt=sse": (GEMINI, [
        ("contents", 0, "parts", 0, "text"), ("generationConfig", "maxOutputTokens"),
        ("generationConfig", "temperature")]),
    "/v1beta/models/sdxl-turbo:generateContent": (GEMINI, [
        ("contents", 0, "parts", 0, "text"), ("contents", 0, "parts", 1, "inlineData", "data"),
        ("generationConfig", "candidateCount"), ("generationConfig", "seed")]),
}


def with_raw(body: dict[str, Any], path: tuple[str | int, ...], raw: str) -> bytes:
    """``body`` as JSON text with the value at ``path`` replaced by the raw text."""
    copy = json.loads(json.dumps(body))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = _RAW
    return json.dumps(copy).replace(f'"{_RAW}"', raw).encode()


def shape_problem(response: httpx.Response, path: str) -> str | None:
    """What is wrong with a response: a 5xx, or an error body not in the API's shape."""
    if response.status_code >= 500:
        return f"status {response.status_code}: {response.text[:200]}"
    if response.status_code < 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code}, not an error body: {response.text[:200]}"
    if is_gemini_path(path.split("?")[0]):
        ok = (isinstance(error.get("code"), int) and isinstance(error.get("message"), str)
              and isinstance(error.get("status"), str))
    else:
        ok = (isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
              and {"param", "code"} <= set(error))
    return None if ok else f"status {response.status_code}, wrong shape: {error}"


@pytest.fixture(scope="module")
def base_url(tiny_weights: Path) -> Iterator[str]:
    settings = Settings(weights_dir=tiny_weights)
    settings.images.min_side = 64
    settings.images.default_size = "64x64"
    with serve(create_app(settings)) as base:
        yield base


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


class Findings:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.problems: list[str] = []
        self.count = 0

    def send(self, what: str, method: str, path: str, expect: int | None = None,
             **kw: Any) -> None:
        self.count += 1
        try:
            response = self.client.request(method, path, **kw)
        except httpx.TransportError as exc:
            self.problems.append(f"{what}: {type(exc).__name__} {exc}")
            return
        problem = shape_problem(response, path)
        if problem is None and expect is not None and response.status_code != expect:
            problem = f"status {response.status_code}, not {expect}: {response.text[:200]}"
        if problem is not None:
            self.problems.append(f"{what}: {problem}")

    def check(self) -> None:
        assert self.count and not self.problems, "\n".join(self.problems)


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("endpoint", list(JSON_ENDPOINTS))
def test_json_bodies_with_hostile_values(client: httpx.Client, endpoint: str) -> None:
    body, paths = JSON_ENDPOINTS[endpoint]
    found = Findings(client)
    for path in paths:
        for name, raw in VALUES.items():
            # Text that is not Unicode, or nesting no request needs, is refused wherever
            # it is (never accepted and carried on to a tokenizer or the database).
            refused = 400 if name.startswith(("surrogate", "deep")) else None
            found.send(f"{endpoint} {'.'.join(map(str, path))}={name}", "POST", endpoint,
                       refused, content=with_raw(body, path, raw), headers=JSON)
    for name, raw_body in BODIES.items():
        for headers in (JSON, {"content-type": "text/plain"}, {}):
            found.send(f"{endpoint} body={name} {headers}", "POST", endpoint,
                       content=raw_body, headers=headers)
    found.check()


def _png() -> bytes:
    return base64.b64decode(IMAGE.split(",", 1)[1])


def test_multipart_edits_with_hostile_fields(client: httpx.Client) -> None:
    found = Findings(client)
    fields = {"prompt": "a cat", "size": "64x64"}
    weird: list[bytes] = [b"\xed\xa0\x80", b"\xff\xfe", b"NaN", b"Infinity", b"1e400", b"-1e20",
                          str(2**70).encode(), b"", b"x" * 50_000, b"[]", b"\x00"]
    for name in ("prompt", "size", "n", "strength", "seed", "model", "response_format",
                 "quality", "steps", "user", "mask"):
        for value in weird:
            data = {**fields, name: value}
            found.send(f"edits multipart {name}={value[:20]!r}", "POST", "/v1/images/edits",
                       data=data, files={"image": ("a.png", _png(), "image/png")})
    for content in (b"", b"not an image", _png()[:40], VALUES["deep-list"].encode(),
                    b"\x89PNG\r\n\x1a\n" + b"\x00" * 100):
        found.send(f"edits multipart image={content[:20]!r}", "POST", "/v1/images/edits",
                   data=fields, files={"image": ("a.png", content, "image/png")})
    found.send("edits multipart no image", "POST", "/v1/images/edits", data=fields,
               files={"other": ("a.txt", b"x", "text/plain")})
    found.send("edits multipart image as a field", "POST", "/v1/images/edits",
               data={**fields, "image": "x"}, files={"other": ("a.txt", b"x")})
    found.send("edits multipart surrogate filename", "POST", "/v1/images/edits", data=fields,
               files={"image": ("\udcff.png".encode("utf-8", "surrogateescape")
                                .decode("latin-1"), _png(), "image/png")})
    found.send("edits multipart many fields", "POST", "/v1/images/edits",
               data={**fields, **{f"f{i}": "x" for i in range(100)}},
               files={"image": ("a.png", _png(), "image/png")})
    found.send("edits multipart too many images", "POST", "/v1/images/edits", data=fields,
               files=[("image[]", (f"{i}.png", _png(), "image/png")) for i in range(12)])
    for raw in (b"--x\r\nbroken", b"", b"\xff" * 100):
        found.send(f"edits broken multipart {raw[:10]!r}", "POST", "/v1/images/edits",
                   content=raw, headers={"content-type": "multipart/form-data; boundary=x"})
    found.send("edits no boundary", "POST", "/v1/images/edits", content=b"x",
               headers={"content-type": "multipart/form-data"})
    found.check()


def test_files_with_hostile_uploads(client: httpx.Client) -> None:
    found = Findings(client)
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": CHAT}).encode()
    for purpose in (b"batch", b"\xed\xa0\x80", b"", b"NaN", b"x" * 5000):
        for content in (line, b"", b"\xff\xfe\n", VALUES["deep-list"].encode(),
                        b'{"custom_id": "\\ud800"}', b"1e400\nNaN\n[]\n"):
            found.send(f"files purpose={purpose[:10]!r} content={content[:20]!r}", "POST",
                       "/v1/files", data={"purpose": purpose},
                       files={"file": ("x.jsonl", content)})
    for filename in (b'"\xed\xa0\x80.jsonl"', b'"\xff.jsonl"', b"*=utf-8''%ED%A0%80.jsonl",
                     b'""', b'"' + b"x" * 5000 + b'"'):
        raw = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
               b'--b\r\nContent-Disposition: form-data; name="file"; filename' +
               (filename if filename.startswith(b"*") else b"=" + filename) +
               b"\r\n\r\n" + line + b"\r\n--b--\r\n")
        found.send(f"files filename {filename[:20]!r}", "POST", "/v1/files", content=raw,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    found.send("files no file", "POST", "/v1/files", data={"purpose": "batch"})
    found.send("files file as a field", "POST", "/v1/files",
               data={"purpose": "batch", "file": "x"})
    found.check()


@pytest.mark.parametrize("template", [
    "/v1/usage?start={}", "/v1/usage?end={}", "/v1/usage?group_by={}",
    "/v1/usage?start=0&end={}", "/v1/batches?after={}", "/v1/batches?limit={}",
    "/v1/batches/{}", "/v1/files/{}", "/v1/files/{}/content", "/v1/models/{}",
    "/v1beta/models/{}", "/v1/images/{}", "/v1/dashboard?start={}"])
def test_query_and_path_values(client: httpx.Client, template: str) -> None:
    found = Findings(client)
    for value in QUERY:
        path = template.format(value)
        if "{}" in template.split("?")[0] and not value:
            continue  # an empty path segment is another route
        found.send(f"GET {path[:80]}", "GET", path)
    found.check()


def test_methods_on_paths_with_hostile_values(client: httpx.Client) -> None:
    found = Findings(client)
    for value in QUERY:
        if not value:
            continue
        found.send(f"cancel {value[:20]}", "POST", f"/v1/batches/{value}/cancel")
        found.send(f"delete {value[:20]}", "DELETE", f"/v1/files/{value}")
        found.send(f"gemini model {value[:20]}", "POST",
                   f"/v1beta/models/{value}:generateContent", content=json.dumps(GEMINI),
                   headers=JSON)
        found.send(f"gemini method {value[:20]}", "POST",
                   f"/v1beta/models/local-vlm:{value}", content=b"{}", headers=JSON)
    found.check()


def test_header_values(client: httpx.Client) -> None:
    found = Findings(client)
    for value in HEADER:
        raw = value.encode("latin-1")
        for name in (b"x-spillway-max-wait-ms", b"x-request-id", b"authorization",
                     b"x-goog-api-key", b"content-length"):
            if name == b"content-length":
                continue  # the HTTP layer itself answers a bad Content-Length
            headers = [(b"content-type", b"application/json"), (name, raw)]
            found.send(f"generations {name.decode()}={value[:20]!r}", "POST",
                       "/v1/images/generations", content=json.dumps(GENERATE),
                       headers=headers)
            found.send(f"chat {name.decode()}={value[:20]!r}", "POST", "/v1/chat/completions",
                       content=json.dumps(CHAT), headers=headers)
            found.send(f"gemini {name.decode()}={value[:20]!r}", "POST",
                       "/v1beta/models/local-vlm:generateContent",
                       content=json.dumps(GEMINI), headers=headers)
    found.check()


def test_a_lone_surrogate_is_a_400_naming_its_field(client: httpx.Client) -> None:
    """pydantic lets "\\ud800" through a plain ``str`` field (``user``, ``input_file_id``),
    where it reached the database as a 500 or was carried on silently; now every such
    field is refused by name. (The SDKs cannot even send one: raw JSON, as an attacker's.)"""
    bad = VALUES["surrogate-in-text"]
    hi: dict[str, Any] = {"model": "local-vlm", "max_tokens": 1,
                          "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[str, dict[str, Any], tuple[str | int, ...], str]] = [
        ("/v1/images/generations", {**GENERATE, "user": 0}, ("user",), "user"),
        ("/v1/images/generations", GENERATE, ("prompt",), "prompt"),
        ("/v1/chat/completions", {**hi, "stop": [0]}, ("stop", 0), "stop[0]"),
        ("/v1/chat/completions", {**hi, "user": 0}, ("user",), "user"),
        ("/v1/batches", BATCH, ("input_file_id",), "input_file_id"),
        ("/v1/batches", {**BATCH, "metadata": {"team": 0}}, ("metadata", "team"),
         "metadata.team"),
        ("/v1/images/edits", EDIT, ("images", 0, "image_url"), "images[0].image_url"),
    ]
    for path, body, where, param in cases:
        r = client.post(path, content=with_raw(body, where, bad), headers=JSON)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, (path, where, r.text)
        assert "lone surrogate" in error["message"], error
    r = client.post("/v1beta/models/local-vlm:generateContent", headers=JSON,
                    content=with_raw(GEMINI, ("contents", 0, "parts", 0, "text"), bad))
    error = r.json()["error"]
    assert r.status_code == 400 and error["status"] == "INVALID_ARGUMENT", r.text
    assert "lone surrogate" in error["message"]


def test_a_body_too_deep_for_the_json_parser_is_a_400_with_a_code(
        client: httpx.Client) -> None:
    deep = '{"prompt": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = client.post("/v1/images/generations", content=deep,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"
