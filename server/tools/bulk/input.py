"""The input file: CSV or JSONL rows read, checked and planned into Rows (bad ones reported
as ``line N: reason``), with their seeds and output file names."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pipelines.registry import MODEL_ID
from server import catalog
from server.config import ImageSettings, Settings
from server.errors import APIError
from server.tools.bulk.rows import BulkInputError, Row
from server.wire.openai_images import MAX_PROMPT_CHARS, MAX_SEED, QUALITY_STEPS, parse_size

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
QUALITIES = ("standard", "hd", "low", "medium", "high", "auto")
LOCAL_MODELS = frozenset({catalog.AUTO, catalog.IMAGE_MODEL})  # a CSV model column, in-process
MAX_N = 10
MIN_STEPS, MAX_STEPS = 1, 4
CSV_EXTS = {".csv"}
JSONL_EXTS = {".jsonl", ".json", ".ndjson"}
# Server mode checks only the form of a size; the server judges its range.
_ANY_SIZE = ImageSettings(min_side=8, max_side=1 << 20)

RawRow = tuple[int, dict[str, Any] | None, str | None]  # line, fields or None, error


def _read_csv(path: Path) -> Iterator[RawRow]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise BulkInputError(f"{path}: cannot read the CSV header: {exc}") from exc
        if header is None:
            raise BulkInputError(f"{path} is empty: expected a header row naming a "
                                 "'prompt' column")
        names = [h.strip().lower() for h in header]
        if "prompt" not in names:
            raise BulkInputError(f"{path} has no 'prompt' column (header: "
                                 f"{', '.join(repr(h) for h in header) or 'empty'})")
        last = reader.line_num
        while True:
            start = last + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if reader.line_num == last:
                    yield start, None, f"broken CSV, stopped reading here: {exc}"
                    return
                last = reader.line_num
                yield start, None, f"broken CSV: {exc}"
                continue
            last = reader.line_num
            if not any(v.strip() for v in fields):
                continue  # blank line
            if len(fields) > len(names):
                yield start, None, (f"{len(fields)} fields but the header names "
                                    f"{len(names)} (quote fields that hold commas)")
                continue
            yield start, dict(zip(header, fields, strict=False)), None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as exc:
                yield number, None, f"broken JSON: {exc}"
                continue
            if not isinstance(obj, dict):
                yield number, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield number, obj, None


def read_input(path: Path) -> Iterator[RawRow]:
    """(line, fields, None) per row, or (line, None, reason) for a line that is not one.

    Raises BulkInputError at once when the file as a whole is unusable."""
    ext = path.suffix.lower()
    if ext not in CSV_EXTS | JSONL_EXTS:
        raise BulkInputError(f"cannot tell the format of {path}: use .csv (with a header "
                             "row) or .jsonl (one JSON object per line)")
    if not path.is_file():
        raise BulkInputError(f"{path}: no such file")
    reader = _read_csv if ext in CSV_EXTS else _read_jsonl
    rows = reader(path)
    try:
        first = next(rows, None)  # the CSV header is checked here, before any work
    except (OSError, UnicodeDecodeError) as exc:
        raise BulkInputError(f"cannot read {path}: {exc}") from exc
    if first is not None:
        yield first
        try:
            yield from rows
        except (OSError, UnicodeDecodeError) as exc:
            raise BulkInputError(f"cannot read {path}: {exc}") from exc


class _Bad(ValueError):
    pass


def _text(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"{key} must be text, not {type(value).__name__}")
        value = str(value)
    return value.strip() or None


def _int(fields: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = fields.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    whole = (isinstance(value, int) and not isinstance(value, bool)
             or isinstance(value, float) and value.is_integer()
             or isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value))
    if not whole:
        raise _Bad(f"{key} {value!r} is not an integer")
    number = int(value)
    if not lo <= number <= hi:
        raise _Bad(f"{key} {number} is outside {lo}..{hi}")
    return number


def derived_seed(line: int, prompt: str) -> int:
    """The seed of a row without one: stable across runs, so a resumed run repeats it."""
    digest = hashlib.sha256(f"{line}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _safe_name(name: str, out_dir: Path) -> str:
    """The file name relative to out_dir (posix), or _Bad when it could land elsewhere."""
    if "\x00" in name:
        raise _Bad(f"filename {name!r} holds a NUL character")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise _Bad(f"filename {name!r} is an absolute path: give one relative to the "
                   "output folder")
    rel = PurePosixPath(name.replace("\\", "/"))
    if ".." in rel.parts:
        raise _Bad(f"filename {name!r} escapes the output folder")
    if rel.suffix.lower() not in FORMATS:
        raise _Bad(f"filename {name!r} has an unknown extension: use "
                   f"{', '.join(FORMATS)}")
    try:
        target = (out_dir / rel).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise _Bad(f"filename {name!r} cannot be used: {exc}") from exc
    if not target.is_relative_to(out_dir) or target == out_dir:
        raise _Bad(f"filename {name!r} escapes the output folder")
    return target.relative_to(out_dir).as_posix()


def _parse_row(line: int, fields: dict[str, Any], settings: Settings, out_dir: Path,
               server_mode: bool) -> Row:
    keys = {str(k).strip().lower(): v for k, v in fields.items() if k is not None}
    prompt_value = keys.get("prompt")
    if prompt_value is None or (isinstance(prompt_value, str) and not prompt_value.strip()):
        raise _Bad("the prompt is empty")
    if not isinstance(prompt_value, str):
        raise _Bad(f"prompt must be text, not {type(prompt_value).__name__}")
    if len(prompt_value) > MAX_PROMPT_CHARS:
        raise _Bad(f"the prompt is {len(prompt_value)} characters, over {MAX_PROMPT_CHARS}")
    size = _text(keys, "size")
    if size is not None and size.lower() == "auto":
        size = None
    width: int | None = None
    height: int | None = None
    try:
        if size is not None:
            width, height = parse_size(size, _ANY_SIZE if server_mode else settings.images)
            size = f"{width}x{height}"
        elif not server_mode:
            width, height = parse_size(None, settings.images)
    except APIError as exc:
        raise _Bad(exc.message) from exc
    seed = _int(keys, "seed", 0, MAX_SEED)
    n = _int(keys, "n", 1, MAX_N) or 1
    steps = _int(keys, "steps", MIN_STEPS, MAX_STEPS)
    quality = _text(keys, "quality")
    if quality is not None:
        quality = quality.lower()
        if quality not in QUALITIES:
            raise _Bad(f"quality {quality!r} is not one of {', '.join(QUALITIES)}")
    model = _text(keys, "model")
    if not server_mode and model is not None and model not in LOCAL_MODELS:
        raise _Bad(f"model {model!r} is not served in-process (only {MODEL_ID!r}): "
                   "run against a server to route it")
    if not server_mode and steps is None:
        steps = QUALITY_STEPS.get(quality or "auto", settings.images.default_steps)
    base = derived_seed(line, prompt_value) if seed is None else seed
    seeds = tuple((base + i) % (MAX_SEED + 1) for i in range(n))
    filename = _text(keys, "filename")
    if filename is None:
        files = tuple(f"{line:06d}-{i}.png" for i in range(1, n + 1))
    else:
        rel = PurePosixPath(_safe_name(filename, out_dir))
        files = (rel.as_posix(),) if n == 1 else tuple(
            rel.with_name(f"{rel.stem}-{i}{rel.suffix}").as_posix() for i in range(1, n + 1))
    fmt = FORMATS[PurePosixPath(files[0]).suffix.lower()]
    return Row(line, dict(fields), prompt_value, size, width, height, steps, quality, model,
               seeds, files, fmt)


def plan_rows(input_path: Path, settings: Settings, out_dir: Path, server_mode: bool
              ) -> tuple[list[Row], list[str]]:
    """Good rows, and ``line N: reason`` for each bad one. out_dir must be resolved."""
    rows: list[Row] = []
    errors: list[str] = []
    claimed: dict[str, int] = {}
    for line, fields, error in read_input(input_path):
        if fields is None:
            errors.append(f"line {line}: {error}")
            continue
        try:
            row = _parse_row(line, fields, settings, out_dir, server_mode)
            for name in row.files:
                other = claimed.get(name.casefold())
                if other is not None:
                    raise _Bad(f"file {name!r} is already the output of line {other}")
        except _Bad as exc:
            errors.append(f"line {line}: {exc}")
            continue
        for name in row.files:
            claimed[name.casefold()] = line
        rows.append(row)
    return rows, errors
