"""What a connection may hold, against uvicorn configured as `spillway serve` configures it
(server/http/server.py), over raw loopback sockets: a huge or slow request head, and a
body that stalls or trickles, get an answer in the OpenAI error shape and a closed
connection, instead of memory and a connection held for as long as the client likes."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from pydantic import SecretStr

from server.app import create_app
from server.config import Settings
from server.http.server import uvicorn_limits
from tests.conftest import free_port

ADMIN = "admin-secret-http-limits-0123456789"


@contextmanager
def serve_as_cli(settings: Settings) -> Iterator[int]:
    """The app with the HTTP limits `spillway serve` gives uvicorn; yields the port."""
    port = free_port()
    app = create_app(settings, loader=None, chat_loader=None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", **uvicorn_limits(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    settings = Settings(ledger_url="sqlite://", admin_key=SecretStr(ADMIN), max_header_kb=8,
                        header_timeout_s=1.0, body_timeout_s=1.0, body_min_bytes_per_s=1000)
    with serve_as_cli(settings) as p:
        yield p


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or 5 s pass: then the test fails on it)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open; got {data[:200]!r}") from None
    return data


def error_of(response: bytes, status: int) -> dict[str, object]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:300]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    return error


def post_head(length: int, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {ADMIN}\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_huge_header_is_refused_before_auth(port: int) -> None:
    with connect(port) as sock:  # no key at all: the head is refused before anyone asks
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        error = error_of(read_all(sock), 431)
    assert error["code"] == "request_header_too_large"
    with connect(port) as sock:  # under the limit: an ordinary answer (401, no key)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000
                     + b"\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 401 ")


def test_a_slow_head_gets_408(port: int) -> None:
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
        for _ in range(3):  # a header now and then: never idle, never done
            time.sleep(0.4)
            try:
                sock.sendall(b"X-A: b\r\n")
            except OSError:
                break
        error = error_of(read_all(sock), 408)
        assert time.monotonic() - started < 3
    assert error["code"] == "request_timeout"


def test_a_stalled_body_gets_408_and_the_connection_closes(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(post_head(1000) + b'{"model": "local-vlm", ')
        started = time.monotonic()
        error = error_of(read_all(sock), 408)
        assert 0.8 < time.monotonic() - started < 3
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"


def test_a_trickled_body_gets_408(port: int) -> None:
    """A byte every 0.3 s never stalls for the 1 s allowed, but is far under 1000 B/s."""
    with connect(port) as sock:
        sock.sendall(post_head(1000))
        started = time.monotonic()
        response = b""
        for _ in range(20):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.3)
            try:
                response = sock.recv(65536)
                break
            except TimeoutError:
                continue
        sock.settimeout(5)
        response += read_all(sock)
        assert time.monotonic() - started < 3
    assert error_of(response, 408)["code"] == "request_timeout"


def test_a_slow_but_steady_body_is_served(port: int) -> None:
    body = json.dumps({"model": "no-such-model", "messages": [{"role": "user",
                                                               "content": "x" * 2900}]})
    with connect(port) as sock:
        sock.sendall(post_head(len(body)))
        for i in range(0, len(body), 1000):  # 2000 B/s, in pieces 0.5 s apart
            time.sleep(0.5)
            sock.sendall(body[i:i + 1000].encode())
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 404 "), head[:200]  # the route answered


def test_an_answer_before_the_body_closes_the_connection(port: int) -> None:
    """A 401 (here: no key) needs none of the body: the rest of a slow body must not keep
    the connection."""
    with connect(port) as sock:
        sock.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 100000"
                     b"\r\nContent-Type: application/json\r\n\r\n{")
        response = read_all(sock)
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_many_slow_clients_are_all_let_go(port: int) -> None:
    socks = [connect(port) for _ in range(40)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(post_head(1000) if i % 2 else b"GET /v1/models HTTP/1.1\r\n")
        started = time.monotonic()
        statuses = {read_all(sock)[9:12] for sock in socks}
        assert time.monotonic() - started < 4
    finally:
        for sock in socks:
            sock.close()
    assert statuses == {b"408"}
