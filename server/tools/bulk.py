"""`spillway batch`: a CSV or JSONL file of prompts -> a folder of images, resumably.

Every output image is written atomically (``name.partial`` then ``os.replace``) and then
recorded in ``manifest.jsonl`` (appended and fsynced), so an interrupted run leaves a
consistent folder and re-running the same command makes only what is missing.

In-process (``server=None``) the engine is loaded once and pending outputs are grouped by
(width, height, steps) into batched pipeline calls. Against a server, rows are POSTed to
``/v1/images/generations`` with ``concurrency`` requests in flight.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from pipelines.registry import MODEL_ID
from server import catalog
from server.config import ImageSettings, Settings
from server.errors import APIError
from server.providers.pricing import gemini_image_cost, local_cost, openai_image_cost
from server.wire.openai_images import MAX_PROMPT_CHARS, MAX_SEED, QUALITY_STEPS, parse_size

if TYPE_CHECKING:
    import httpx
    from PIL import Image

    from pipelines.sdxl_turbo import SDXLTurbo

MANIFEST = "manifest.jsonl"
PARTIAL = ".partial"
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
QUALITIES = ("standard", "hd", "low", "medium", "high", "auto")
LOCAL_MODELS = frozenset({catalog.AUTO, catalog.IMAGE_MODEL})  # a CSV model column, in-process
MAX_N = 10
MIN_STEPS, MAX_STEPS = 1, 4
RETRIES = 4  # after the first try: 429 / 5xx / unreachable
MAX_BACKOFF_S = 30.0
CSV_EXTS = {".csv"}
JSONL_EXTS = {".jsonl", ".json", ".ndjson"}
# Server mode checks only the form of a size; the server judges its range.
_ANY_SIZE = ImageSettings(min_side=8, max_side=1 << 20)


class BulkError(Exception):
    """The run cannot go on (bad input file, output folder busy or unwritable)."""


class BulkInputError(BulkError):
    """The input file as a whole is unusable; raised before any work is done."""


@dataclass(frozen=True)
class Row:
    """One good input row; it makes ``len(seeds)`` images."""

    line: int
    input: dict[str, Any]
    prompt: str
    size: str | None  # "WxH" as asked; None: the default size
    width: int | None  # None only in server mode without a size: the server decides
    height: int | None
    steps: int | None
    quality: str | None
    model: str | None
    seeds: tuple[int, ...]
    files: tuple[str, ...]  # relative to the output folder, posix
    fmt: str


@dataclass(frozen=True)
class Output:
    row: Row
    index: int  # 1-based

    @property
    def seed(self) -> int:
        return self.row.seeds[self.index - 1]

    @property
    def file(self) -> str:
        return self.row.files[self.index - 1]


@dataclass
class BulkSummary:
    written: int = 0  # images made this run
    skipped: int = 0  # already in the manifest with their file present
    bad_rows: int = 0  # input rows rejected before any work
    failed: int = 0  # images that could not be made (server refusal, pipeline error)
    wall_s: float = 0.0
    cost_usd: float = 0.0
    cloud_cost_usd: float = 0.0  # what the written images would have cost all-cloud
    cloud_provider: str = "openai"
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.written} image(s) written, {self.skipped} skipped (already done), "
                f"{self.bad_rows} bad row(s), {self.failed} failed; "
                f"{self.wall_s:.1f} s, {self.images_per_s:.2f} images/s; "
                f"cost ${self.cost_usd:.4f} (all-cloud on {self.cloud_provider}: "
                f"${self.cloud_cost_usd:.4f})")


# -- input ----------------------------------------------------------------------------
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


# -- output folder --------------------------------------------------------------------
def _remove_partials(out_dir: Path) -> None:
    """Leftovers of an interrupted write; symlinked folders are not followed."""
    for folder, _, names in os.walk(out_dir):
        for name in names:
            leftover = Path(folder) / name
            if name.endswith(PARTIAL) and not leftover.is_symlink():
                with contextlib.suppress(OSError):
                    leftover.unlink()


def load_manifest(out_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The outputs already done: manifest records whose file is present.

    A truncated last line (a run killed mid-write), unreadable lines, duplicates and
    records whose file is gone are dropped, and the manifest is rewritten without them."""
    path = out_dir / MANIFEST
    if not path.exists():
        return {}
    raw = path.read_bytes()
    done: dict[tuple[int, int], dict[str, Any]] = {}
    rewrite = bool(raw) and not raw.endswith(b"\n")
    for text in raw.split(b"\n"):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            key = (int(record["line"]), int(record["index"]))
            file = record["file"]
            present = isinstance(file, str) and (out_dir / file).is_file()
        except (ValueError, KeyError, TypeError):
            rewrite = True
            continue
        if not present or key in done:
            rewrite = True
            continue
        done[key] = record
    if rewrite:
        tmp = path.with_name(path.name + PARTIAL)
        with tmp.open("w", encoding="utf-8") as f:
            for record in done.values():
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done


class _FolderLock:
    """One run per output folder (flock on the folder itself, where the OS has it)."""

    def __init__(self, out_dir: Path) -> None:
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise BulkError(f"another run is writing to {out_dir}") from exc
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


class _Reporter:
    """Messages through ``echo``, and one self-rewriting progress line on stderr."""

    def __init__(self, echo: Callable[[str], None], progress: bool, total: int) -> None:
        self.echo = echo
        self.progress = progress and total > 0
        self.total = total
        self.done = 0
        self.failed = 0
        self.start = time.monotonic()
        self.lock = threading.RLock()
        self._width = 0
        self._drawn_at = 0.0
        self._drawn = (-1, -1)

    def restart(self) -> None:
        """Rates count from here (after the model has loaded)."""
        with self.lock:
            self.start = time.monotonic()

    def say(self, message: str) -> None:
        with self.lock:
            self._clear()
            self.echo(message)

    def count(self, written: int = 0, failed: int = 0) -> None:
        with self.lock:
            self.done += written
            self.failed += failed
            now = time.monotonic()
            if now - self._drawn_at >= 0.2 or self.done + self.failed >= self.total:
                self._draw(now)

    def _draw(self, now: float) -> None:
        if not self.progress:
            return
        self._drawn_at = now
        self._drawn = (self.done, self.failed)
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done - self.failed
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        text = f"{self.done + self.failed}/{self.total} images, {rate:.1f} images/s, ETA {eta}"
        if self.failed:
            text += f", {self.failed} failed"
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)

    def _clear(self) -> None:
        if self.progress and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0

    def finish(self) -> None:
        with self.lock:
            if self.progress and self._width:
                if self._drawn != (self.done, self.failed):
                    self._draw(time.monotonic())
                sys.stderr.write("\n")
                sys.stderr.flush()
                self._width = 0


class _Sink:
    """Puts finished images in place and in the manifest; shared by all workers."""

    def __init__(self, out_dir: Path, settings: Settings, summary: BulkSummary,
                 reporter: _Reporter) -> None:
        self.out_dir = out_dir
        self.prices = settings.prices
        self.provider = settings.router.image_provider
        self.summary = summary
        self.reporter = reporter
        self.lock = threading.Lock()
        self.closed = False
        self.manifest = (out_dir / MANIFEST).open("a", encoding="utf-8")

    def cloud_cost(self, row: Row, width: int, height: int) -> float:
        if self.provider == "gemini":
            return gemini_image_cost(self.prices, 1)
        from server.providers.pricing import nearest_size

        return openai_image_cost(self.prices, row.quality or "auto", nearest_size(width, height),
                                 1)

    def save(self, out: Output, data: bytes, *, route: str, model: str, cost_usd: float,
             latency_ms: float, width: int, height: int, seed: int) -> None:
        cloud = self.cloud_cost(out.row, width, height)
        with self.lock:
            if self.closed:
                return  # interrupted: the work is abandoned, the next run redoes it
            path = self.out_dir / out.file
            tmp = path.with_name(path.name + PARTIAL)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                # this name clashes with a folder or file in the way: this image only
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                clash: OSError | None = exc
            except OSError as exc:  # disk full, permissions: nothing more can be written
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                self.closed = True
                raise BulkError(f"cannot write {path}: {exc}") from exc
            else:
                clash = None
                record = {"line": out.row.line, "index": out.index, "input": out.row.input,
                          "file": out.file, "seed": seed, "width": width, "height": height,
                          "model": model, "route": route, "cost_usd": round(cost_usd, 8),
                          "latency_ms": round(latency_ms, 1)}
                try:
                    self.manifest.write(json.dumps(record) + "\n")
                    self.manifest.flush()
                    os.fsync(self.manifest.fileno())
                except OSError as exc:
                    self.closed = True
                    raise BulkError(f"cannot write {self.out_dir / MANIFEST}: {exc}") from exc
                self.summary.written += 1
                self.summary.cost_usd += cost_usd
                self.summary.cloud_cost_usd += cloud
        if clash is not None:
            self.fail([out], f"cannot write {out.file}: {clash.strerror or clash}")
        else:
            self.reporter.count(written=1)

    def fail(self, outs: list[Output], reason: str) -> None:
        message = f"line {outs[0].row.line}: {reason}"
        with self.lock:
            if self.closed:
                return
            self.summary.failed += len(outs)
            self.summary.errors.append(message)
        self.reporter.say(message)
        self.reporter.count(failed=len(outs))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            with contextlib.suppress(OSError):
                self.manifest.close()


# -- in-process -----------------------------------------------------------------------
def _batches(pending: list[Output], batch_size: int) -> Iterator[list[Output]]:
    groups: dict[tuple[int | None, int | None, int | None], list[Output]] = {}
    for out in pending:
        groups.setdefault((out.row.width, out.row.height, out.row.steps), []).append(out)
    for outs in groups.values():
        for i in range(0, len(outs), batch_size):
            yield outs[i:i + batch_size]


class _Writer:
    """Encodes and saves finished batches on a thread while the next batch computes."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.error: BaseException | None = None
        self.queue: queue.Queue[tuple[list[Output], list[Image.Image], float] | None] = \
            queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._work, name="bulk-writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        from server.media.encode import encode_image

        prices = self.sink.prices
        while (job := self.queue.get()) is not None:
            outs, images, seconds = job
            if self.error is not None:
                continue
            try:
                for out, image in zip(outs, images, strict=True):
                    data = encode_image(image, out.row.fmt, None)
                    self.sink.save(out, data, route="local", model=MODEL_ID,
                                   cost_usd=local_cost(prices, seconds / len(outs)),
                                   latency_ms=seconds * 1000, width=image.width,
                                   height=image.height, seed=out.seed)
            except BaseException as exc:  # handed to the main thread
                self.error = exc

    def put(self, outs: list[Output], images: list[Image.Image], seconds: float) -> None:
        self.check()
        self.queue.put((outs, images, seconds))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Let the queued batches be written; a second Ctrl-C abandons them."""
        self.queue.put(None)
        while self.thread.is_alive():
            self.thread.join(0.1)
        self.check()


def _generate(engine: SDXLTurbo, chunk: list[Output], sink: _Sink
              ) -> tuple[list[Output], list[Image.Image]]:
    """One batched call; if it fails, each item alone, so one bad item costs only itself."""
    from pipelines.base import ImageItem

    def item(out: Output) -> ImageItem:
        row = out.row
        assert row.width is not None and row.height is not None and row.steps is not None
        return ImageItem(row.prompt, out.seed, row.width, row.height, row.steps)

    try:
        return chunk, engine.text2img([item(out) for out in chunk])
    except Exception as exc:
        if len(chunk) == 1:
            sink.fail(chunk, f"image {chunk[0].index}: generation failed: {exc}")
            return [], []
    made: list[Output] = []
    images: list[Image.Image] = []
    for out in chunk:
        try:
            images.extend(engine.text2img([item(out)]))
            made.append(out)
        except Exception as exc:
            sink.fail([out], f"image {out.index}: generation failed: {exc}")
    return made, images


def _run_local(pending: list[Output], settings: Settings, batch_size: int,
               sink: _Sink) -> None:
    from server.providers.local.loading import load_engine

    try:
        engine, _ = load_engine(settings)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise BulkError(str(exc)) from exc
    sink.reporter.restart()
    writer = _Writer(sink)
    interrupted = False
    try:
        for chunk in _batches(pending, batch_size):
            writer.check()
            started = time.perf_counter()
            made, images = _generate(engine, chunk, sink)
            if made:
                writer.put(made, images, time.perf_counter() - started)
    except KeyboardInterrupt:
        interrupted = True
    writer.close()  # the batches already made are written
    if interrupted:
        raise KeyboardInterrupt


# -- against a server -----------------------------------------------------------------
def _runs(outs: list[Output]) -> Iterator[list[Output]]:
    """Consecutive indexes of one row: one request each (seed s, s+1, ... as n)."""
    run: list[Output] = []
    for out in outs:
        if run and (out.row is not run[-1].row or out.index != run[-1].index + 1):
            yield run
            run = []
        run.append(out)
    if run:
        yield run


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_S * 2)
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:200].strip() or response.reason_phrase


def _parse_size(text: object) -> tuple[int, int] | None:
    if isinstance(text, str):
        m = re.fullmatch(r"(\d+)x(\d+)", text)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def _request(client: httpx.Client, outs: list[Output], sink: _Sink,
             stop: threading.Event) -> None:
    import httpx

    row = outs[0].row
    body: dict[str, Any] = {"prompt": row.prompt, "n": len(outs), "seed": outs[0].seed,
                            "response_format": "b64_json", "output_format": row.fmt}
    for key, value in (("size", row.size), ("model", row.model), ("quality", row.quality),
                       ("steps", row.steps)):
        if value is not None:
            body[key] = value
    problem = ""
    unreachable = False
    for attempt in range(RETRIES + 1):
        started = time.perf_counter()
        delay: float | None = None
        try:
            response = client.post("/v1/images/generations", json=body)
        except httpx.TransportError as exc:
            unreachable = isinstance(exc, httpx.ConnectError)
            problem = f"cannot reach the server: {exc or type(exc).__name__}"
        else:
            unreachable = False
            if response.status_code == 200:
                _save_response(response, outs, sink, time.perf_counter() - started)
                return
            problem = f"server answered {response.status_code}: {_error_message(response)}"
            if response.status_code == 401:  # the key, not the row: every row would fail
                raise BulkError(problem)
            if response.status_code != 429 and response.status_code < 500:
                sink.fail(outs, problem)
                return
            delay = _retry_after(response)
        if attempt == RETRIES:
            break
        if delay is None:
            delay = min(MAX_BACKOFF_S, 0.5 * 2 ** attempt) * random.uniform(0.8, 1.2)
        if stop.wait(delay):
            return
    if unreachable:  # the server is gone: the rest would only wait out their retries
        raise BulkError(f"line {row.line}: gave up after {RETRIES + 1} tries: {problem}")
    sink.fail(outs, f"gave up after {RETRIES + 1} tries: {problem}")


def _save_response(response: httpx.Response, outs: list[Output], sink: _Sink,
                   seconds: float) -> None:
    row = outs[0].row
    try:
        body = response.json()
        data = body["data"]
        if not isinstance(data, list) or len(data) != len(outs):
            raise ValueError(f"{len(data) if isinstance(data, list) else 'no'} image(s) "
                             f"for n={len(outs)}")
        images = [base64.b64decode(entry["b64_json"], validate=True) for entry in data]
    except (ValueError, KeyError, TypeError) as exc:
        sink.fail(outs, f"the server's answer is unusable: {exc}")
        return
    route = response.headers.get("x-spillway-route", "unknown")
    try:
        cost = float(response.headers.get("x-spillway-cost-usd", "0"))
    except ValueError:
        cost = 0.0
    size = _parse_size(body.get("size")) or (row.width or 1024, row.height or 1024)
    model = MODEL_ID if route == "local" else (row.model or route)
    for out, entry, data_bytes in zip(outs, data, images, strict=True):
        seed = entry.get("seed")
        sink.save(out, data_bytes, route=route, model=model, cost_usd=cost / len(outs),
                  latency_ms=seconds * 1000, width=size[0], height=size[1],
                  seed=seed if isinstance(seed, int) else out.seed)


def _run_server(pending: list[Output], server: str, api_key: str | None, concurrency: int,
                sink: _Sink) -> None:
    import httpx

    base = server.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    tasks: queue.Queue[list[Output]] = queue.Queue()
    for run in _runs(pending):
        tasks.put(run)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stop = threading.Event()
    failure: list[BaseException] = []
    client = httpx.Client(base_url=base, headers=headers,
                          timeout=httpx.Timeout(600.0, connect=10.0),
                          limits=httpx.Limits(max_connections=concurrency,
                                              max_keepalive_connections=concurrency))

    def work() -> None:
        while not stop.is_set():
            try:
                outs = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                _request(client, outs, sink, stop)
            except BulkError as exc:  # the folder, the key or the server: no use going on
                failure.append(exc)
                stop.set()
            except Exception as exc:
                if stop.is_set():
                    return
                sink.fail(outs, f"request failed: {exc}")

    try:  # any answer will do: it is there
        client.get("/healthz", timeout=10.0)
    except httpx.TransportError as exc:
        client.close()
        raise BulkError(f"cannot reach {base}: {exc or type(exc).__name__}") from exc
    threads = [threading.Thread(target=work, name=f"bulk-{i}", daemon=True)
               for i in range(min(concurrency, tasks.qsize()))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
    finally:
        # On Ctrl-C the requests in flight are abandoned (the sink drops what they
        # bring back); their threads are daemons and end with their request.
        stop.set()
        client.close()
    if failure:
        raise failure[0]


# -- entry ----------------------------------------------------------------------------
def run_bulk(input_path: Path, out_dir: Path, settings: Settings, *, server: str | None = None,
             api_key: str | None = None, batch_size: int = 8, concurrency: int = 8,
             echo: Callable[[str], None] = print, progress: bool = True) -> BulkSummary:
    """Make every image the input asks for that out_dir does not already hold.

    Raises BulkInputError (before any work) for an unusable input file and BulkError
    when the output folder cannot be used; bad rows are reported and skipped. Ctrl-C
    returns a summary with ``interrupted`` set."""
    if batch_size < 1:
        raise BulkError(f"batch size {batch_size} is below 1")
    if concurrency < 1:
        raise BulkError(f"concurrency {concurrency} is below 1")
    started = time.monotonic()
    summary = BulkSummary(cloud_provider=settings.router.image_provider)
    resolved = out_dir.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise BulkError(f"{out_dir} exists and is not a folder")
    reporter = _Reporter(echo, progress, 0)
    lock: _FolderLock | None = None
    sink: _Sink | None = None
    try:
        rows, errors = plan_rows(input_path, settings, resolved, server is not None)
        summary.bad_rows = len(errors)
        summary.errors.extend(errors)
        for message in errors:
            echo(message)
        try:
            resolved.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BulkError(f"cannot make {out_dir}: {exc}") from exc
        lock = _FolderLock(resolved)
        _remove_partials(resolved)
        done = load_manifest(resolved)
        pending = [Output(row, i) for row in rows for i in range(1, len(row.seeds) + 1)
                   if (row.line, i) not in done]
        summary.skipped = sum(len(row.seeds) for row in rows) - len(pending)
        reporter = _Reporter(echo, progress, len(pending))
        sink = _Sink(resolved, settings, summary, reporter)
        if pending:
            if server is None:
                _run_local(pending, settings, batch_size, sink)
            else:
                _run_server(pending, server, api_key, concurrency, sink)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if sink is not None:
            sink.close()
        if lock is not None:
            _remove_partials(resolved)
            lock.release()
        reporter.finish()
        summary.wall_s = time.monotonic() - started
    if summary.interrupted:
        echo(f"interrupted: {summary.written + summary.skipped} done, re-run the same "
             "command to resume")
    echo(summary.describe())
    return summary
