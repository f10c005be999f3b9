"""Validating a batch: each input line is checked as its endpoint would check it, short of
fetching images; valid lines become pending items (an image item gets its seed here), the
rest become rejects, which go straight to the error file.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, insert, select

from server.batches.store import (
    CANCELLING,
    CHAT,
    GENERATIONS,
    IN_PROGRESS,
    MAX_CUSTOM_ID,
    PENDING,
    VALIDATING,
    BatchRow,
    ItemRow,
    RejectRow,
    Store,
    cancel_pending,
    new_line_id,
)
from server.config import MediaSettings
from server.errors import APIError, bad_request
from server.media import intake
from server.serving import Serving
from server.serving.images import check_edit
from server.wire import safejson
from server.wire.openai_chat import ChatRequest
from server.wire.openai_images import MAX_SEED, ImageEditRequest, ImageGenerationRequest

log = logging.getLogger(__name__)

MAX_BATCH_ERRORS = 1000  # entries kept in a failed batch's `errors`


def item_seed(batch_id: str, custom_id: str) -> int:
    """The seed an image item without one gets: the same on every run of the batch."""
    digest = hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (MAX_SEED + 1)


class Reject(Exception):
    """An input line that fails validation: its code, message and custom_id, if any."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


def pydantic_message(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid value.", None
    loc = ".".join(str(p) for p in errors[0]["loc"])
    msg = str(errors[0]["msg"])
    return (f"Invalid value for {loc!r}: {msg}." if loc else f"{msg}."), (loc or None)


@dataclass(frozen=True)
class Line:
    """A batch line's body as its typed request: what validation checks and the worker
    runs, both parsed by the one ``typed`` (an edit's sources are the URLs it names)."""

    chat: ChatRequest | None = None
    image: ImageGenerationRequest | None = None  # an ImageEditRequest for /v1/images/edits
    sources: list[str] = field(default_factory=list)
    mask: str | None = None  # an edit's mask.image_url (inpainting)


def typed(endpoint: str, body: dict[str, Any], media: MediaSettings) -> Line:
    if endpoint == CHAT:
        return Line(chat=ChatRequest.model_validate(body))
    if body.get("stream"):
        raise bad_request("Streaming is not available in a batch; omit 'stream'.",
                          param="stream", code="unsupported_value")
    if endpoint == GENERATIONS:
        return Line(image=ImageGenerationRequest.model_validate(body))
    fields = dict(body)
    sources = edit_refs(fields.pop("images", None), media)
    mask = fields.pop("mask", None)
    if mask is not None and not (isinstance(mask, dict) and isinstance(mask.get("image_url"),
                                                                       str)):
        raise bad_request("mask must be {\"image_url\": ...}.", param="mask")
    return Line(image=ImageEditRequest.model_validate(fields), sources=sources,
                mask=None if mask is None else str(mask["image_url"]))


class Validator:
    """Turns a batch's input file into its items and rejects, once (a restart that finds a
    batch still ``validating`` does it again: the rows are replaced, not added to)."""

    def __init__(self, store: Store, serving: Serving) -> None:
        self.store = store
        self.serving = serving

    def pending(self) -> list[str]:
        with self.store.read() as s:
            return list(s.scalars(select(BatchRow.id).where(
                BatchRow.validated.is_(False), BatchRow.status.in_((VALIDATING, CANCELLING)))
                .order_by(BatchRow.seq)))

    def validate(self, batch_id: str) -> None:
        """Parse every line: valid ones become pending items, the rest rejects."""
        with self.store.read() as s:
            batch = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
        if batch is None or batch.validated:
            return
        items: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        fatal: dict[str, Any] | None = None
        seen: dict[str, int] = {}
        try:
            with self.store.file_path(batch.input_file_id).open("rb") as f:
                for n, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        items.append(check_line(n, raw, batch, seen, self.serving))
                    except Reject as bad:
                        rejects.append({"batch_id": batch_id, "line": n,
                                        "line_id": new_line_id(),
                                        "custom_id": bad.custom_id, "code": bad.code,
                                        "message": f"line {n}: {bad.message}"[:2000]})
                    except Exception as exc:  # one line's surprise is that line's error
                        log.exception("batch %s: line %d could not be checked", batch_id, n)
                        rejects.append({"batch_id": batch_id, "line": n,
                                        "line_id": new_line_id(), "custom_id": None,
                                        "code": "invalid_request",
                                        "message": f"line {n}: this line could not be "
                                                   f"processed ({type(exc).__name__})."})
        except OSError:
            fatal = {"code": "file_not_found", "line": None, "param": "input_file_id",
                     "message": f"The input file {batch.input_file_id} cannot be read."}
        if fatal is None and not items and not rejects:
            fatal = {"code": "empty_file", "line": None, "param": "input_file_id",
                     "message": "The input file has no requests."}
        now = int(time.time())
        with self.store.write() as s:
            row = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
            if row is None or row.validated:
                return
            s.execute(delete(ItemRow).where(ItemRow.batch_id == batch_id))
            s.execute(delete(RejectRow).where(RejectRow.batch_id == batch_id))
            for start in range(0, len(items), 1000):
                s.execute(insert(ItemRow), items[start:start + 1000])
            for start in range(0, len(rejects), 1000):
                s.execute(insert(RejectRow), rejects[start:start + 1000])
            row.validated = True
            if row.status == CANCELLING:
                cancel_pending(s, batch_id, "batch_cancelled",
                               "The batch was cancelled before this request ran.")
            elif items:
                row.status, row.in_progress_at = IN_PROGRESS, now
            else:  # every line is bad: finalize.advance fails the batch (and writes its error file)
                row.errors = [fatal] if fatal else [
                    {"code": r["code"], "message": r["message"], "param": None,
                     "line": r["line"]} for r in rejects[:MAX_BATCH_ERRORS]]
            s.commit()
        log.info("batch %s: %d requests, %d bad lines", batch_id, len(items), len(rejects))


def check_line(n: int, raw: bytes, batch: BatchRow, seen: dict[str, int], serving: Serving
               ) -> dict[str, Any]:
    """One input line -> the row of its pending item, or ``Reject`` with its reason."""
    try:
        # Nesting limit and valid Unicode: a line nested 100,000 deep, or a custom_id
        # with a lone surrogate, is this line's error, not the worker's.
        obj = safejson.parse(raw)
    except safejson.JSONError as exc:
        where = f" (at {exc.path})" if exc.path else ""
        raise Reject("invalid_json_line", f"{exc.message}{where}") from exc
    if not isinstance(obj, dict):
        raise Reject("invalid_json_line", "a line must be a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise Reject("missing_custom_id", "custom_id is missing or not a non-empty "
                     "string.", custom_id if isinstance(custom_id, str) else None)
    if len(custom_id) > MAX_CUSTOM_ID:
        raise Reject("invalid_custom_id",
                     f"custom_id is longer than {MAX_CUSTOM_ID} characters.")
    if custom_id in seen:
        raise Reject("duplicate_custom_id", f"custom_id {custom_id!r} is already used on "
                     f"line {seen[custom_id]}.", custom_id)
    seen[custom_id] = n
    if obj.get("method") != "POST":
        raise Reject("invalid_method", f"method must be 'POST', not "
                     f"{str(obj.get('method'))[:20]!r}.", custom_id)
    if obj.get("url") != batch.endpoint:
        raise Reject("invalid_url", f"url {str(obj.get('url'))[:80]!r} is not this "
                     f"batch's endpoint {batch.endpoint!r}.", custom_id)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise Reject("invalid_body", "body must be a JSON object.", custom_id)
    try:
        body = check_body(batch.endpoint, body, batch.id, custom_id, serving)
    except APIError as err:
        raise Reject(err.code or "invalid_request", err.message, custom_id) from err
    except ValidationError as exc:
        raise Reject("invalid_value", pydantic_message(exc)[0], custom_id) from exc
    return {"batch_id": batch.id, "line": n, "line_id": new_line_id(),
            "custom_id": custom_id, "method": "POST", "url": batch.endpoint,
            "body": body, "state": PENDING, "attempts": 0, "not_before": 0.0}


def check_body(endpoint: str, body: dict[str, Any], batch_id: str, custom_id: str,
               serving: Serving) -> dict[str, Any]:
    """The endpoint's own checks (the serving layer's), short of fetching images; image
    bodies get a seed."""
    line = typed(endpoint, body, serving.images.settings.media)
    if line.chat is not None:
        serving.chat.check(line.chat, batch=True)
        return body
    assert line.image is not None
    if isinstance(line.image, ImageEditRequest):
        check_edit(line.image, serving.images.settings)
    else:
        serving.images.generation_job(line.image)
    if body.get("seed") is None:
        body = {**body, "seed": item_seed(batch_id, custom_id)}
    return body


def edit_refs(raw: Any, settings: MediaSettings) -> list[str]:
    """``images: [{"image_url": "data:… | https://…"}]`` in a JSON edit body."""
    if not isinstance(raw, list) or not raw or not all(
            isinstance(r, dict) and isinstance(r.get("image_url"), str) for r in raw):
        raise bad_request("images must be a non-empty list of {\"image_url\": ...}.",
                          param="images")
    intake.check_count(len(raw), settings, param="images")
    return [str(r["image_url"]) for r in raw]
