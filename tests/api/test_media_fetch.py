"""server.media.intake fetching against real HTTP servers on loopback.

127.0.0.2 (Linux routes all of 127/8 to lo) plays the "public" server: tests allow-list it
with ``allow_networks``. 127.0.0.1 and ::1 host canaries that count every connection they
accept; every SSRF attempt must leave them at zero.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from server.config import MediaSettings
from server.errors import APIError
from server.media import fetch as fetch_module
from server.media.fetch import fetch_url
from server.media.intake import load_image

PUBLIC = "127.0.0.2"  # stands in for a public server; allow-listed where used
ALLOW_PUBLIC = MediaSettings(allow_networks=[f"{PUBLIC}/32"], fetch_timeout_s=5.0)

Route = Callable[[BaseHTTPRequestHandler], None]


def png_bytes(width: int = 21, height: int = 13) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


def send_png(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(len(PNG)))
    h.end_headers()
    h.wfile.write(PNG)


class Server(ThreadingHTTPServer):
    """Serves ``routes`` by path; counts accepted connections and records requests."""

    daemon_threads = True

    def __init__(self, host: str, routes: dict[str, Route], *, ipv6: bool = False) -> None:
        self.address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
        self.routes = routes
        self.connections = 0
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        super().__init__((host, 0), _Handler)
        self.port = int(self.server_address[1])
        # A short poll keeps shutdown() (test teardown) quick.
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1  # counted before any byte is parsed
        super().process_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        route = self.server.routes.get(self.path.split("?")[0]) or self.server.routes.get("*")
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self)
        except OSError:
            pass  # the client hung up on us, as it should for refused bodies

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(host: str, routes: dict[str, Route], *, ipv6: bool = False) -> Server:
        server = Server(host, routes, ipv6=ipv6)
        server.thread.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Server]:
    server = Server("127.0.0.1", {"*": send_png})
    server.thread.start()
    yield server
    server.shutdown()
    server.server_close()
    assert server.connections == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def canary6() -> Iterator[Server]:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    server = Server("::1", {"*": send_png}, ipv6=True)
    server.thread.start()
    yield server
    server.shutdown()
    server.server_close()
    assert server.connections == 0


def refused(url: str, media: MediaSettings = ALLOW_PUBLIC) -> APIError:
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(url, media, param="image_url"))
    err = info.value
    assert err.status == 400
    assert err.param == "image_url"
    assert len(err.message) < 400
    return err


# --- SSRF: all refused, no canary connection ------------------------------------------------

SSRF_URLS = [
    ("http://127.0.0.1:{port}/x.png", "image_url_refused"),
    ("http://localhost:{port}/", "image_url_refused"),
    ("http://2130706433:{port}/", "image_url_refused"),
    ("http://0x7f000001:{port}/", "image_url_refused"),
    ("http://0x7f.1:{port}/", "image_url_refused"),
    ("http://0177.0.0.1:{port}/", "image_url_refused"),
    ("http://127.1:{port}/", "image_url_refused"),
    ("http://0.0.0.0:{port}/", "image_url_refused"),
    ("http://0:{port}/", "image_url_refused"),
    ("http://[::ffff:127.0.0.1]:{port}/", "image_url_refused"),
    ("http://[::ffff:7f00:1]:{port}/", "image_url_refused"),
    ("http://[64:ff9b::7f00:1]:{port}/", "image_url_refused"),
    ("http://allowed\\@127.0.0.1:{port}/", "invalid_image_url"),
    ("http://127.0.0.2\\@127.0.0.1:{port}/", "invalid_image_url"),
    ("http://user@127.0.0.1:{port}/", "invalid_image_url"),
    ("http://127.0.0.2:80@127.0.0.1:{port}/", "invalid_image_url"),
    ("http://127.0.0.2%40127.0.0.1:{port}/", "invalid_image_url"),
    ("http://127.0.0.1:{port}\t/", "invalid_image_url"),
    ("file:///etc/passwd", "invalid_image_url"),
    ("gopher://127.0.0.1:{port}/_GET%20/", "invalid_image_url"),
    ("ftp://127.0.0.1:{port}/x.png", "invalid_image_url"),
    ("dict://127.0.0.1:{port}/", "invalid_image_url"),
]


@pytest.mark.parametrize("template,code", SSRF_URLS)
def test_ssrf_urls_are_refused_and_never_connect(canary: Server, template: str,
                                                 code: str) -> None:
    err = refused(template.format(port=canary.port))
    assert err.code == code, err.message
    assert canary.connections == 0


def test_fully_qualified_localhost_is_refused(canary: Server) -> None:
    # Resolves to loopback where the resolver knows "localhost."; fails to resolve elsewhere.
    err = refused(f"http://LOCALHOST.:{canary.port}/")
    assert err.code in ("image_url_refused", "image_fetch_failed")
    assert canary.connections == 0


def test_ipv6_loopback_is_refused(canary6: Server) -> None:
    err = refused(f"http://[::1]:{canary6.port}/x.png")
    assert err.code == "image_url_refused"
    err = refused(f"http://[0:0:0:0:0:0:0:1]:{canary6.port}/")
    assert err.code == "image_url_refused"
    assert canary6.connections == 0


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://10.0.0.1/x.png", "http://192.168.1.1/", "http://172.16.0.1/",
    "http://100.64.0.1/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://[::]/",
])
def test_private_and_metadata_addresses_are_refused_without_connecting(url: str) -> None:
    start = time.monotonic()
    err = refused(url)
    assert err.code == "image_url_refused", err.message
    assert time.monotonic() - start < 1.0  # no connection attempt, so no connect timeout


def test_metadata_stays_refused_even_inside_allow_networks() -> None:
    media = MediaSettings(allow_networks=["169.254.0.0/16", "100.64.0.0/10"])
    assert refused("http://169.254.169.254/latest/", media).code == "image_url_refused"
    assert refused("http://100.100.100.200/latest/", media).code == "image_url_refused"


def test_loopback_is_refused_by_default(serve: Callable[..., Server]) -> None:
    server = serve(PUBLIC, {"/x.png": send_png})
    err = refused(f"http://{PUBLIC}:{server.port}/x.png", MediaSettings())
    assert err.code == "image_url_refused"
    assert server.connections == 0


# --- redirects ------------------------------------------------------------------------------


def redirect_to(location: str, status: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_loopback_is_refused(canary: Server, serve: Callable[..., Server],
                                         status: int) -> None:
    server = serve(PUBLIC, {"/img": redirect_to(f"http://127.0.0.1:{canary.port}/x.png",
                                                status)})
    err = refused(f"http://{PUBLIC}:{server.port}/img")
    assert err.code == "image_url_refused"
    assert server.connections == 1
    assert canary.connections == 0


@pytest.mark.parametrize("location", [
    "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
    "http://allowed\\@127.0.0.1/", "//127.0.0.1:{port}/x.png",
])
def test_other_bad_redirects_are_refused(canary: Server, serve: Callable[..., Server],
                                         location: str) -> None:
    server = serve(PUBLIC, {"/img": redirect_to(location.format(port=canary.port))})
    err = refused(f"http://{PUBLIC}:{server.port}/img")
    assert err.code in ("image_url_refused", "invalid_image_url")
    assert canary.connections == 0


def test_relative_redirect_is_followed(serve: Callable[..., Server]) -> None:
    server = serve(PUBLIC, {"/a/start": redirect_to("../img.png"), "/img.png": send_png})
    image = asyncio.run(load_image(f"http://{PUBLIC}:{server.port}/a/start", ALLOW_PUBLIC))
    assert image.size == (21, 13)
    assert [path for path, _ in server.requests] == ["/a/start", "/img.png"]


def test_redirect_chain_longer_than_max_redirects_is_refused(
        serve: Callable[..., Server]) -> None:
    def hop(h: BaseHTTPRequestHandler) -> None:
        n = int(h.path.rsplit("/", 1)[1])
        redirect_to(f"/loop/{n + 1}")(h)

    server = serve(PUBLIC, {"*": hop})
    media = MediaSettings(allow_networks=[f"{PUBLIC}/32"], max_redirects=2)
    err = refused(f"http://{PUBLIC}:{server.port}/loop/0", media)
    assert err.code == "image_fetch_failed"
    assert "redirected more than 2" in err.message
    assert len(server.requests) == 3  # the first request and two redirects, no more

    exact = {"/0": redirect_to("/1"), "/1": redirect_to("/2"), "/2": send_png}
    ok = serve(PUBLIC, exact)
    assert asyncio.run(load_image(f"http://{PUBLIC}:{ok.port}/0", media)).size == (21, 13)


def test_redirect_without_location_fails(serve: Callable[..., Server]) -> None:
    def bare(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Content-Length", "0")
        h.end_headers()

    server = serve(PUBLIC, {"/x": bare})
    assert refused(f"http://{PUBLIC}:{server.port}/x").code == "image_fetch_failed"


# --- allowed fetches ------------------------------------------------------------------------


def test_allowed_fetch_returns_the_image(serve: Callable[..., Server]) -> None:
    server = serve(PUBLIC, {"/x.png": send_png})
    image = asyncio.run(load_image(f"http://{PUBLIC}:{server.port}/x.png?v=1", ALLOW_PUBLIC))
    assert image.size == (21, 13)
    assert image.mode == "RGB"
    assert server.requests == [("/x.png?v=1", f"{PUBLIC}:{server.port}")]


def test_host_header_keeps_the_name_while_connecting_to_the_checked_address(
        serve: Callable[..., Server]) -> None:
    # localhost may resolve to ::1 first, where nothing listens on this port: the fetch
    # falls back to the next checked address, never to a fresh lookup.
    server = serve("127.0.0.1", {"/x.png": send_png})
    media = MediaSettings(allow_networks=["127.0.0.0/8", "::1/128"])
    data = asyncio.run(fetch_url(f"http://localhost:{server.port}/x.png", media))
    assert data == PNG
    assert server.requests == [("/x.png", f"localhost:{server.port}")]


def test_404_is_a_fetch_failure(serve: Callable[..., Server]) -> None:
    server = serve(PUBLIC, {})
    err = refused(f"http://{PUBLIC}:{server.port}/missing.png")
    assert err.code == "image_fetch_failed"
    assert "404" in err.message


def test_non_image_body_is_refused(serve: Callable[..., Server]) -> None:
    def html(h: BaseHTTPRequestHandler) -> None:
        body = b"<html><body>hello</body></html>"
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    server = serve(PUBLIC, {"/": html})
    assert refused(f"http://{PUBLIC}:{server.port}/").code == "unsupported_image_format"


def test_connection_refused_is_a_fetch_failure() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind((PUBLIC, 0))
        port = s.getsockname()[1]
    assert refused(f"http://{PUBLIC}:{port}/x.png").code == "image_fetch_failed"


def test_private_and_unresolvable_hosts_read_the_same(canary: Server,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Otherwise the refusal is a DNS oracle: a client could tell which internal names
    exist ("resolves to a private address") from which do not ("could not be resolved").
    The operator's log still tells them apart."""
    with caplog.at_level(logging.INFO, logger="server.media.fetch"):
        private = refused(f"http://localhost:{canary.port}/x.png")
        missing = refused(f"http://no-such-host.invalid:{canary.port}/x.png")
    assert private.code == missing.code == "image_url_refused"
    assert private.message.replace("localhost", "HOST") == missing.message.replace(
        "no-such-host.invalid", "HOST")
    assert "loopback" not in private.message and "resolved" not in missing.message.replace(
        "does not resolve", "")
    logged = [r.getMessage() for r in caplog.records if r.name == "server.media.fetch"]
    assert any("localhost" in m and "loopback" in m for m in logged), logged
    assert any("no-such-host.invalid" in m and "could not be resolved" in m for m in logged)
    assert canary.connections == 0


# --- caps: bytes and time -------------------------------------------------------------------


def test_endless_body_is_cut_at_max_bytes(serve: Callable[..., Server]) -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()  # no Content-Length: the body runs until the connection ends
        chunk = b"\x89PNG" + b"\0" * 16380
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h.wfile.write(chunk)

    server = serve(PUBLIC, {"/": endless})
    media = MediaSettings(allow_networks=[f"{PUBLIC}/32"], max_bytes=64 * 1024)
    start = time.monotonic()
    err = refused(f"http://{PUBLIC}:{server.port}/", media)
    assert err.code == "image_too_large"
    assert time.monotonic() - start < 2.0


def test_trickling_body_is_cut_at_the_deadline(serve: Callable[..., Server]) -> None:
    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):  # keeps every per-read timeout happy, never finishes
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.3)

    server = serve(PUBLIC, {"/": trickle})
    media = MediaSettings(allow_networks=[f"{PUBLIC}/32"], fetch_timeout_s=1.0)
    start = time.monotonic()
    err = refused(f"http://{PUBLIC}:{server.port}/", media)
    elapsed = time.monotonic() - start
    assert err.code == "image_fetch_timeout"
    assert 0.9 < elapsed < 3.0


def test_deadline_covers_the_whole_redirect_chain(serve: Callable[..., Server]) -> None:
    def slow_redirect(h: BaseHTTPRequestHandler) -> None:
        time.sleep(0.4)  # each hop is quick enough on its own; together they are not
        n = int(h.path.rsplit("/", 1)[1])
        redirect_to(f"/r/{n + 1}")(h)

    server = serve(PUBLIC, {"*": slow_redirect})
    media = MediaSettings(allow_networks=[f"{PUBLIC}/32"], fetch_timeout_s=1.0,
                          max_redirects=10)
    start = time.monotonic()
    assert refused(f"http://{PUBLIC}:{server.port}/r/0", media).code == "image_fetch_timeout"
    assert time.monotonic() - start < 2.5


def test_content_length_over_max_bytes_is_refused_without_reading(
        serve: Callable[..., Server]) -> None:
    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(100 * 2**20))
        h.end_headers()
        h.wfile.write(b"\x89PNG")
        h.wfile.flush()
        time.sleep(3)  # the body never comes; only the header can answer in time

    server = serve(PUBLIC, {"/": huge})
    media = MediaSettings(allow_networks=[f"{PUBLIC}/32"], max_bytes=64 * 1024)
    start = time.monotonic()
    err = refused(f"http://{PUBLIC}:{server.port}/", media)
    assert err.code == "image_too_large"
    assert str(100 * 2**20) in err.message
    assert time.monotonic() - start < 1.0


def test_compressed_body_is_refused(serve: Callable[..., Server]) -> None:
    def gzipped(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", "10")
        h.end_headers()
        h.wfile.write(b"\x1f\x8b" + b"\0" * 8)

    server = serve(PUBLIC, {"/": gzipped})
    err = refused(f"http://{PUBLIC}:{server.port}/")
    assert err.code == "image_fetch_failed"
    assert server.requests and server.requests[0][0] == "/"


# --- TLS: connect to the checked address, verify the name -----------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def test_https_verifies_the_name_not_the_address(serve: Callable[..., Server],
                                                  tls_cert: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tls_cert
    server = serve("127.0.0.1", {"/x.png": send_png})
    seen_sni: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen_sni.append(name)

    server_ctx.sni_callback = record_sni
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    media = MediaSettings(allow_networks=["127.0.0.0/8", "::1/128"])
    url = f"https://localhost:{server.port}/x.png"

    # The default trust store does not know this certificate: refused, cleanly.
    err = refused(url, media)
    assert err.code == "image_fetch_failed"
    assert server.requests == []

    # Trusting it, the fetch works although the connection goes to 127.0.0.1: the
    # certificate names only "localhost", so verification used the URL's name (via SNI).
    client_ctx = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(fetch_module, "_ssl_context", lambda: client_ctx)
    assert asyncio.run(fetch_url(url, media)) == PNG
    assert "localhost" in seen_sni
    assert server.requests[-1] == ("/x.png", f"localhost:{server.port}")

    # Naming the address instead fails: the certificate is not valid for 127.0.0.1.
    err = refused(f"https://127.0.0.1:{server.port}/x.png", media)
    assert err.code == "image_fetch_failed"
