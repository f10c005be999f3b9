"""server.media.intake decoding: formats, caps, base64 and data URLs. No network."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import time
import zlib

import pytest
from PIL import Image

from server.config import MediaSettings
from server.errors import APIError
from server.media.intake import decode_base64, decode_data_url, decode_image_bytes, load_image

MEDIA = MediaSettings()


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    return Image.frombytes(mode, (width, height), os.urandom(width * height * channels))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, rows: int = 0) -> bytes:
    """A PNG whose header claims width x height, with ``rows`` rows of real data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * ((width * 3 + 1) * rows))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def refusal(fn: object, *args: object, **kw: object) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    err = info.value
    assert err.status == 400
    assert len(err.message) < 400
    return err


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# --- accepted formats ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"),
                                      ("JPEG", "RGB"), ("JPEG", "CMYK"), ("WEBP", "RGB"),
                                      ("GIF", "P")])
def test_accepted_formats_decode_to_rgb(fmt: str, mode: str) -> None:
    source = noise(37, 23, "RGB").convert(mode)
    image = decode_image_bytes(encode(source, fmt), MEDIA)
    assert image.mode == "RGB"
    assert image.size == (37, 23)


def test_png_pixels_survive() -> None:
    source = noise(16, 9)
    assert decode_image_bytes(encode(source, "PNG"), MEDIA).tobytes() == source.tobytes()


def test_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (10, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image_bytes(data, MEDIA)
    assert image.size == (10, 8)
    assert image.getpixel((5, 4)) == (255, 0, 0)


def test_animated_webp_gives_first_frame() -> None:
    frames = [Image.new("RGB", (10, 8), c) for c in ((0, 0, 255), (255, 0, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                  lossless=True)
    assert decode_image_bytes(data, MEDIA).getpixel((5, 4)) == (0, 0, 255)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert decode_image_bytes(data, MEDIA).size == (20, 40)


# --- refused images -----------------------------------------------------------------------


def test_truncated_png_is_refused() -> None:
    data = encode(noise(64, 64), "PNG")
    err = refusal(decode_image_bytes, data[: len(data) // 2], MEDIA)
    assert err.code == "invalid_image"


def test_truncated_jpeg_is_refused() -> None:
    data = encode(noise(64, 64), "JPEG", quality=95)
    err = refusal(decode_image_bytes, data[: len(data) // 2], MEDIA)
    assert err.code == "invalid_image"


@pytest.mark.parametrize("data,named", [
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
    (b"hello, this is not an image at all", "not a recognised image"),
])
def test_unsupported_formats_are_refused(data: bytes, named: str) -> None:
    err = refusal(decode_image_bytes, data, MEDIA, param="image")
    assert err.code == "unsupported_image_format"
    assert err.param == "image"
    assert named in err.message


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO"])
def test_formats_pillow_knows_but_we_do_not_accept(fmt: str) -> None:
    err = refusal(decode_image_bytes, encode(noise(16, 16), fmt), MEDIA)
    assert err.code == "unsupported_image_format"


def test_empty_bytes_are_refused() -> None:
    assert refusal(decode_image_bytes, b"", MEDIA).code == "invalid_image"


@pytest.mark.parametrize("width,height", [(0, 0), (0, 10), (10, 0)])
def test_zero_sized_png_is_refused(width: int, height: int) -> None:
    err = refusal(decode_image_bytes, crafted_png(width, height), MEDIA)
    assert err.code == "invalid_image"


def test_decompression_bomb_is_refused_before_allocation() -> None:
    data = crafted_png(30000, 30000, rows=4)  # claims 900 Mpx, weighs a few hundred bytes
    assert len(data) < 2000
    start = time.monotonic()
    err = refusal(decode_image_bytes, data, MEDIA)
    assert time.monotonic() - start < 1.0
    assert err.code == "image_too_large"


def test_pixel_cap_is_ours_not_pillows() -> None:
    # 8000x8000 = 64 Mpx is under Pillow's own warning threshold (~89 Mpx) but over
    # max_pixels; had the pixels been decoded, the 1-row body would read as truncated.
    err = refusal(decode_image_bytes, crafted_png(8000, 8000, rows=1), MEDIA)
    assert err.code == "image_too_large"
    assert "8000x8000" in err.message
    small = MediaSettings(max_pixels=100)
    assert refusal(decode_image_bytes, encode(noise(11, 10), "PNG"), small).code == (
        "image_too_large")
    assert decode_image_bytes(encode(noise(10, 10), "PNG"), small).size == (10, 10)


def test_bytes_over_max_bytes_are_refused() -> None:
    media = MediaSettings(max_bytes=1024)
    data = encode(noise(40, 40), "PNG")
    assert len(data) > 1024
    err = refusal(decode_image_bytes, data, media)
    assert err.code == "image_too_large"
    assert "1024" in err.message


# --- base64 and data URLs -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["aGVsbG8/Pz4+", "aGVsbG8_Pz4-", "aGk=", "aGk", "aGVsbG8"])
def test_decode_base64_accepts_both_alphabets_and_optional_padding(text: str) -> None:
    expected = {"aGVsbG8/Pz4+": b"hello??>>", "aGVsbG8_Pz4-": b"hello??>>",
                "aGk=": b"hi", "aGk": b"hi", "aGVsbG8": b"hello"}[text]
    assert decode_base64(text, 1024, param="image") == expected


@pytest.mark.parametrize("text", ["aGk$", "aG k=", "aGk=\n", "aG=k", "", "=", "aGVsb",
                                  "aGVsbG8\u00e9"])
def test_decode_base64_refuses_invalid(text: str) -> None:
    err = refusal(decode_base64, text, 1024, param="image")
    assert err.code == "invalid_image"
    assert err.param == "image"


def test_decode_base64_refuses_oversize_before_scanning() -> None:
    text = "A" * 4_000_000 + "$"  # the bad char would be found only by a full scan
    start = time.monotonic()
    err = refusal(decode_base64, text, 1024, param="image")
    assert err.code == "image_too_large"
    assert time.monotonic() - start < 0.1


def test_data_url_standard_base64() -> None:
    data = encode(noise(12, 7), "PNG")
    assert decode_data_url(data_url(data), MEDIA) == data
    image = asyncio.run(load_image(data_url(data), MEDIA))
    assert image.size == (12, 7) and image.mode == "RGB"


def test_data_url_urlsafe_base64_without_padding() -> None:
    for _ in range(20):  # noise until the encoding uses the URL-safe characters
        data = encode(noise(13, 7), "PNG")
        payload = base64.urlsafe_b64encode(data).decode().rstrip("=")
        if ("-" in payload or "_" in payload) and len(data) % 3:
            break
    image = asyncio.run(load_image(f"data:image/png;base64,{payload}", MEDIA))
    assert image.size == (13, 7)


def test_data_url_percent_encoded_payload() -> None:
    data = encode(noise(5, 5), "PNG")
    payload = base64.b64encode(data).decode()
    quoted = payload.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    assert decode_data_url(f"data:image/png;base64,{quoted}", MEDIA) == data


def test_data_url_mime_does_not_decide_the_format() -> None:
    data = encode(noise(5, 5), "JPEG")
    assert asyncio.run(load_image(data_url(data, "image/png"), MEDIA)).size == (5, 5)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(data_url(svg, "image/png"), MEDIA))
    assert info.value.code == "unsupported_image_format"


@pytest.mark.parametrize("url,code", [
    ("data:image/png,rawbytes", "invalid_image_url"),            # not base64
    ("data:image/png;charset=utf-8,abcd", "invalid_image_url"),  # not base64
    ("data:image/png;base64", "invalid_image_url"),               # no comma
    ("data:image/png;base64,iVBO$$$", "invalid_image"),           # bad character
    ("data:image/png;base64,iVBORw0KG", "invalid_image"),         # truncated base64
    ("data:image/png;base64,", "invalid_image"),                  # empty
])
def test_bad_data_urls_are_refused(url: str, code: str) -> None:
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(url, MEDIA))
    assert info.value.code == code
    assert info.value.param == "image_url"


def test_data_url_of_a_truncated_png_is_refused() -> None:
    data = encode(noise(64, 64), "PNG")
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(data_url(data[:-200]), MEDIA))
    assert info.value.code == "invalid_image"


def test_data_url_over_max_bytes_is_refused_cheaply() -> None:
    media = MediaSettings(max_bytes=4096)
    url = "data:image/png;base64," + "A" * 8000
    err = refusal(decode_data_url, url, media)
    assert err.code == "image_too_large"


def test_messages_do_not_echo_huge_input() -> None:
    url = "gopher://" + "x" * 100_000
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(url, MEDIA))
    assert len(info.value.message) < 300


# --- schemes and URL syntax refused before any network use ---------------------------------


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "FILE:///etc/passwd", "gopher://example.com/", "ftp://example.com/x",
    "javascript:alert(1)", "jar:http://example.com/x!/y", "example.com/x.png", "/x.png", "",
    " http://example.com/x.png", "http:///x.png", "http://", "http://ex ample.com/",
    "http://example.com:99999/", "http://example.com:8o/", "http://example.com:-1/",
    "http://[::1/", "http://[fe80::1%25eth0]/", "http://exa%6dple.com/",
    "http://example.com\\@127.0.0.1/", "http://user:pw@example.com/",
    "http://example.com/\nx", "http://example.com:0/",
])
def test_bad_urls_are_refused_without_network(url: str) -> None:
    with pytest.raises(APIError) as info:
        asyncio.run(load_image(url, MEDIA, param="image_url"))
    assert info.value.status == 400
    assert info.value.code == "invalid_image_url"
    assert info.value.param == "image_url"
