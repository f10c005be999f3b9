"""The entry `spillway batch` calls: plan the rows, take the folder, make what is missing
(in-process or against a server), and sum it up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from server.config import Settings
from server.tools.bulk.folder import (
    FolderLock,
    Sink,
    load_manifest,
    remove_partials,
)
from server.tools.bulk.inprocess import run_local
from server.tools.bulk.input import plan_rows
from server.tools.bulk.progress import Reporter
from server.tools.bulk.remote import run_server
from server.tools.bulk.rows import BulkError, BulkSummary, Output


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
    summary = BulkSummary(cloud_provider=settings.reference("image").name)
    resolved = out_dir.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise BulkError(f"{out_dir} exists and is not a folder")
    reporter = Reporter(echo, progress, 0)
    lock: FolderLock | None = None
    sink: Sink | None = None
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
        lock = FolderLock(resolved)
        remove_partials(resolved)
        done = load_manifest(resolved)
        pending = [Output(row, i) for row in rows for i in range(1, len(row.seeds) + 1)
                   if (row.line, i) not in done]
        summary.skipped = sum(len(row.seeds) for row in rows) - len(pending)
        reporter = Reporter(echo, progress, len(pending))
        sink = Sink(resolved, settings, summary, reporter)
        if pending:
            if server is None:
                run_local(pending, settings, batch_size, sink)
            else:
                run_server(pending, server, api_key, concurrency, sink)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if sink is not None:
            sink.close()
        if lock is not None:
            remove_partials(resolved)
            lock.release()
        reporter.finish()
        summary.wall_s = time.monotonic() - started
    if summary.interrupted:
        echo(f"interrupted: {summary.written + summary.skipped} done, re-run the same "
             "command to resume")
    echo(summary.describe())
    return summary
