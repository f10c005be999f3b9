"""Fetching an image by http(s) URL, safely: the server's one outbound request made on a
user's behalf.

It is an SSRF surface (vLLM CVE-2025-6242 and the parser-disagreement bypasses of its
fixes), so a URL is parsed strictly, its host is resolved once, every resolved address
must be public (or inside ``MediaSettings.allow_networks``), and the connection goes to
the address that was checked, never to the name again. Redirects are followed by hand and
every hop gets the same treatment. Bytes and time are capped.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

import httpx

from server.config import MediaSettings
from server.errors import APIError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_URL_CHARS = 8192  # http(s) URLs only; data URLs are bounded by max_bytes instead
_SHOW_CHARS = 100  # never echo more user input than this in a message
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Always refused, even inside allow_networks: an operator allowing 169.254.0.0/16 or
# 100.64.0.0/10 for some device on the LAN does not mean to hand out cloud credentials.
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
    "169.254.170.2",    # AWS ECS task metadata
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",    # AWS IMDS over IPv6
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Strict authority: a hostname of DNS characters or a bracketed IPv6 literal, then an
# optional numeric port. No userinfo, no percent-encoding, no IPv6 zone ids: anything a
# second parser could read differently is refused instead of interpreted.
_AUTHORITY_RE = re.compile(r"(?:\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{0,5})?", re.IGNORECASE)
_SCHEME_RE = re.compile(r"([a-z][a-z0-9+.-]*):", re.IGNORECASE)


# ---------------------------------------------------------------------------------------
# errors


def show(text: str) -> str:
    """User input for a message: quoted, and cut so a huge value cannot flood the reply."""
    if len(text) > _SHOW_CHARS:
        return repr(text[:_SHOW_CHARS]) + "..."
    return repr(text)


def refuse(param: str, message: str, code: str) -> APIError:
    return APIError(400, f"Invalid value for {param!r}: {message}", param=param, code=code)


async def fetch_url(url: str, media: MediaSettings, *, param: str = "image_url") -> bytes:
    """GET an http(s) URL safely: public addresses only, redirects re-checked, capped."""
    try:
        async with asyncio.timeout(media.fetch_timeout_s):
            return await _fetch_following_redirects(url, media, param)
    except TimeoutError:
        raise refuse(param, f"fetching {show(url)} took longer than "
                      f"{media.fetch_timeout_s:g} s.", "image_fetch_timeout") from None


# ---------------------------------------------------------------------------------------
# URL checks


@dataclass(frozen=True)
class _Target:
    """An http(s) URL that passed the syntax checks, split into what the fetch needs."""

    url: str
    scheme: str
    host: str          # lower-case, IPv6 without brackets: what gets resolved
    port: int
    host_header: str   # the authority as written: what the server sees in Host
    path_query: str    # starts with '/'


def scheme_of(ref: str) -> str | None:
    match = _SCHEME_RE.match(ref)
    return match.group(1).lower() if match else None


def _parse_http_url(url: str, param: str) -> _Target:
    def bad(why: str) -> APIError:
        return refuse(param, f"the URL {show(url)} {why}", "invalid_image_url")

    if len(url) > _MAX_URL_CHARS:
        raise bad(f"is longer than {_MAX_URL_CHARS} characters.")
    # Backslashes, whitespace and control characters are where URL parsers disagree
    # (http://allowed\@127.0.0.1/ reads as two different hosts); refuse, don't interpret.
    for ch in url:
        if ch == "\\" or ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            raise bad(f"contains the character {ch!r}; it must not.")
    scheme = scheme_of(url)
    if scheme not in ("http", "https"):
        shown = show(scheme) if scheme else "(none)"
        raise bad(f"has the scheme {shown}; only http and https URLs are fetched.")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host
        raise bad("cannot be parsed.") from None
    netloc = parts.netloc
    if not netloc:
        raise bad("has no host.")
    if "@" in netloc:
        raise bad("contains credentials ('@' before the host); they are not accepted.")
    if not _AUTHORITY_RE.fullmatch(netloc):
        raise bad("has an invalid host or port.")
    host = parts.hostname or ""
    if not host:
        raise bad("has no host.")
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad("has an invalid IPv6 address.") from None
    try:
        port = parts.port
    except ValueError:
        raise bad("has an invalid port.") from None
    if port == 0:
        raise bad("has an invalid port.")
    path_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(url=url, scheme=scheme, host=host,
                   port=port or (443 if scheme == "https" else 80),
                   host_header=netloc, path_query=path_query)


@functools.lru_cache(maxsize=16)
def _allowed_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            log.warning("media.allow_networks: ignoring invalid network %r", cidr)
    return tuple(networks)


def _addresses_to_judge(addr: IPAddress) -> list[IPAddress]:
    """The address(es) whose nature decides whether ``addr`` may be reached.

    IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) forms are only a way of
    writing an IPv4 destination: judge that IPv4 address alone. 6to4 and Teredo addresses
    are real IPv6 addresses that also embed one: both must pass.
    """
    if isinstance(addr, ipaddress.IPv4Address):
        return [addr]
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr in _NAT64:
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    if addr.sixtofour is not None:
        return [addr, addr.sixtofour]
    if addr.teredo is not None:
        return [addr, addr.teredo[1]]
    return [addr]


def _refusal_reason(addr: IPAddress, allowed: tuple[IPNetwork, ...]) -> str | None:
    """Why ``addr`` must not be fetched from, or None if it may."""
    judged = _addresses_to_judge(addr)
    if any(a in _METADATA_ADDRESSES for a in judged):
        return "a cloud metadata address"
    if any(a in net for a in [addr, *judged] for net in allowed):
        return None
    for a in judged:
        for kind in ("loopback", "private", "link_local", "multicast", "unspecified",
                     "reserved"):
            if getattr(a, f"is_{kind}"):
                return f"a {kind.replace('_', '-')} address"
        if not a.is_global:  # e.g. 100.64.0.0/10 (shared address space)
            return "a non-public address"
    return None


def _host_refused(target: _Target, param: str, detail: str) -> APIError:
    """One answer for a host name that does not resolve and one that resolves somewhere
    private: telling them apart would let a client map the internal DNS. The operator
    still sees which it was (logged at INFO, without the client's key)."""
    log.info("image fetch refused: %r %s", target.host[:_SHOW_CHARS], detail)
    return refuse(param, f"the host {show(target.host)} does not resolve to a public "
                   "address; images are only fetched from public addresses.",
                   "image_url_refused")


async def _resolve_checked(target: _Target, media: MediaSettings,
                           param: str) -> list[IPAddress]:
    """Resolve the host once; every address must be fetchable, or the URL is refused."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _host_refused(target, param, f"could not be resolved ({exc})") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        # A link-local IPv6 result may carry a zone ("fe80::1%eth0"); the zone is not
        # part of the address being judged.
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if addr not in addresses:
            addresses.append(addr)
    if not addresses:
        raise _host_refused(target, param, "resolved to no address")
    allowed = _allowed_networks(tuple(media.allow_networks))
    for addr in addresses:
        reason = _refusal_reason(addr, allowed)
        if reason is None:
            continue
        if not _is_ip_literal(target.host):
            raise _host_refused(target, param, f"resolves to {addr}, {reason}")
        # The client wrote the address itself: naming why it is refused tells it nothing.
        raise refuse(param, f"{addr} is {reason}; images are only fetched from public "
                      "addresses.", "image_url_refused")
    return addresses


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# fetching


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Built once: loading the CA bundle per request costs tens of milliseconds.
    try:
        import certifi
        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


async def _fetch_following_redirects(url: str, media: MediaSettings, param: str) -> bytes:
    current = url
    for _ in range(media.max_redirects + 1):
        target = _parse_http_url(current, param)
        addresses = await _resolve_checked(target, media, param)
        outcome = await _get_from_any(target, addresses, media, param)
        if isinstance(outcome, bytes):
            return outcome
        # A redirect: resolve it against the current URL and start over with every check.
        current = urllib.parse.urljoin(current, outcome)
    raise refuse(param, f"fetching {show(url)} was redirected more than "
                  f"{media.max_redirects} times.", "image_fetch_failed")


async def _get_from_any(target: _Target, addresses: list[IPAddress], media: MediaSettings,
                        param: str) -> bytes | str:
    """Try the checked addresses in resolver order (e.g. IPv6 first, then IPv4)."""
    failure = ""
    for addr in addresses:
        try:
            return await _get(target, addr, media, param)
        except httpx.ConnectError as exc:
            failure = str(exc) or type(exc).__name__
    raise refuse(param, f"could not connect to {show(target.host_header)}: "
                  f"{failure[:_SHOW_CHARS]}", "image_fetch_failed")


async def _get(target: _Target, addr: IPAddress, media: MediaSettings,
               param: str) -> bytes | str:
    """One GET to one checked address: the body, or the Location of a redirect."""
    ip_text = f"[{addr}]" if addr.version == 6 else str(addr)
    # The URL names the checked address, so nothing re-resolves the host; Host and SNI
    # carry the real name so virtual hosting and certificate checks still work.
    url = f"{target.scheme}://{ip_text}:{target.port}{target.path_query}"
    headers = {"Host": target.host_header, "User-Agent": "Spillway-image-fetch",
               "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    # A fresh client per hop: a shared pool keys connections by address only and could
    # reuse a TLS session verified for a different name on the same IP.
    client = httpx.AsyncClient(verify=_ssl_context(), trust_env=False,
                               follow_redirects=False,
                               timeout=httpx.Timeout(media.fetch_timeout_s))
    try:
        async with client, client.stream("GET", url, headers=headers,
                                         extensions=extensions) as response:
            return await _read_response(response, target, media, param)
    except httpx.ConnectError:
        raise  # the caller tries the next address
    except httpx.TimeoutException:
        raise refuse(param, f"fetching {show(target.url)} timed out.",
                      "image_fetch_timeout") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise refuse(param, f"fetching {show(target.url)} failed: "
                      f"{(str(exc) or type(exc).__name__)[:_SHOW_CHARS]}",
                      "image_fetch_failed") from None


async def _read_response(response: httpx.Response, target: _Target, media: MediaSettings,
                         param: str) -> bytes | str:
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise refuse(param, f"{show(target.url)} answered HTTP {status} without a "
                          "Location.", "image_fetch_failed")
        return str(location)
    if not 200 <= status < 300:
        raise refuse(param, f"{show(target.url)} answered HTTP {status}.",
                      "image_fetch_failed")
    # We asked for identity; a compressed body would have to be inflated without a bound.
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise refuse(param, f"{show(target.url)} sent a {show(encoding)}-encoded body; "
                      "only uncompressed responses are accepted.", "image_fetch_failed")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > media.max_bytes:
        raise refuse(param, f"{show(target.url)} is {declared} bytes; the limit is "
                      f"{media.max_bytes}.", "image_too_large")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > media.max_bytes:
            raise refuse(param, f"{show(target.url)} is larger than the limit of "
                          f"{media.max_bytes} bytes.", "image_too_large")
    return bytes(body)
