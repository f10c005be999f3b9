"""The OpenAI Batch API: /v1/files (purpose "batch") and /v1/batches.

Shapes as the official ``openai`` SDK parses them (``FileObject``, ``Batch``, cursor
pages). The work itself, and where it is stored, is server/batches/.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ConfigDict
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from server.batches.files import MAX_FILE_BYTES, UPLOAD_SLACK_BYTES
from server.batches.service import BatchService
from server.batches.store import file_object
from server.errors import APIError, bad_request
from server.http.deps import State, caller_of
from server.http.middleware import RequestContext
from server.retry_after import retry_headers
from server.services import AppState
from server.wire.openai_images import WireModel

router = APIRouter()


class UploadBodyLimit:
    """``RequestContext`` (request ids, the body cap) with the Files API's larger cap on
    ``POST /v1/files`` and the server's ``max_body`` everywhere else."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.default = RequestContext(app, max_body)
        self.upload = RequestContext(app, max(max_body,
                                              MAX_FILE_BYTES + UPLOAD_SLACK_BYTES))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path") == "/v1/files"):
            await self.upload(scope, receive, send)
        else:
            await self.default(scope, receive, send)


def _service(state: AppState) -> BatchService:
    if state.batches is None:
        raise APIError(503, "Batches are not available yet.", type="server_error",
                       code="batches_not_ready", headers=retry_headers(5.0))
    return state.batches


@router.post("/v1/files")
async def create_file(request: Request, state: State) -> JSONResponse:
    service = _service(state)
    form = await request.form(max_files=1, max_fields=16)
    try:
        purpose = form.get("purpose")
        if purpose != "batch":
            raise bad_request(f"Unsupported purpose {str(purpose)[:40]!r}: this server "
                              "accepts files with purpose 'batch'.", param="purpose",
                              code="unsupported_value")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("Send the file as a multipart part named 'file'.", param="file",
                              code="missing_required_parameter")
        body = await asyncio.to_thread(service.save_upload, upload.file,
                                       upload.filename or "upload.jsonl", purpose,
                                       caller_of(request).owner)
    finally:
        await form.close()
    return JSONResponse(body)


@router.get("/v1/files")
async def list_files(request: Request, state: State, purpose: str | None = None,
                     limit: int = Query(10_000, ge=1, le=10_000), after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> JSONResponse:
    """The caller's files (OpenAI's `files.list`): newest first unless `order=asc`."""
    return JSONResponse(await asyncio.to_thread(
        _service(state).list_files, caller_of(request), purpose=purpose, limit=limit,
        after=after, order=order))


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request, state: State) -> JSONResponse:
    row = await asyncio.to_thread(_service(state).get_file, file_id, caller_of(request))
    return JSONResponse(file_object(row))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request, state: State) -> FileResponse:
    path, row = await asyncio.to_thread(_service(state).open_content, file_id,
                                        caller_of(request))
    return FileResponse(path, media_type="application/octet-stream", filename=row.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request, state: State) -> JSONResponse:
    return JSONResponse(await asyncio.to_thread(_service(state).delete_file, file_id,
                                                caller_of(request)))


class BatchCreate(WireModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, request: Request, state: State) -> JSONResponse:
    service = _service(state)
    batch = await asyncio.to_thread(service.create_batch, body.input_file_id, body.endpoint,
                                    body.completion_window, body.metadata, caller_of(request))
    service.wake()
    return JSONResponse(batch)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request, state: State) -> JSONResponse:
    return JSONResponse(await asyncio.to_thread(_service(state).get_batch, batch_id,
                                                caller_of(request)))


@router.get("/v1/batches")
async def list_batches(request: Request, state: State, after: str | None = None,
                       limit: int = Query(20, ge=1, le=100)) -> JSONResponse:
    return JSONResponse(await asyncio.to_thread(_service(state).list_batches, after, limit,
                                                caller_of(request)))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, state: State) -> JSONResponse:
    service = _service(state)
    batch = await asyncio.to_thread(service.cancel_batch, batch_id, caller_of(request))
    service.wake()
    return JSONResponse(batch)
