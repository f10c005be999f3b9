"""The output folder: leftover partial files, the manifest (what is already done), the
one-run-per-folder lock, and the Sink that puts finished images in place."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from server.config import Settings
from server.providers.pricing import image_cost
from server.tools.bulk.progress import Reporter
from server.tools.bulk.rows import BulkError, BulkSummary, Output, Row

MANIFEST = "manifest.jsonl"
PARTIAL = ".partial"


def remove_partials(out_dir: Path) -> None:
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


class FolderLock:
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


class Sink:
    """Puts finished images in place and in the manifest; shared by all workers."""

    def __init__(self, out_dir: Path, settings: Settings, summary: BulkSummary,
                 reporter: Reporter) -> None:
        self.out_dir = out_dir
        self.prices = settings.prices
        self.reference = settings.reference("image")
        self.summary = summary
        self.reporter = reporter
        self.lock = threading.Lock()
        self.closed = False
        self.manifest = (out_dir / MANIFEST).open("a", encoding="utf-8")

    def cloud_cost(self, row: Row, width: int, height: int) -> float:
        """What this image would have cost on the upstream local work is compared with."""
        model = self.reference.image_model or ""
        return image_cost(self.prices, self.reference, model, row.quality or "auto", width,
                          height, 1) or 0.0

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
