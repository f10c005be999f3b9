"""The batch worker: claim pending items, run each as its HTTP endpoint would (the same
dispatcher, quota and ledger row), store the answer; validate and finalize batches in turn.

An item is ``sending`` (claimed by this process) while it runs; ``before_send`` records
the upstream on it, committed on the FULL-synchronous engine, *before* a cloud call, so a
crash never sends an item to a cloud twice (lease.py's reconcile reads that mark).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select, update

from server.batches.finalize import advance, fail_batch, finalize
from server.batches.lease import Lease
from server.batches.store import (
    DONE,
    IN_PROGRESS,
    ITEM_FAILED,
    PENDING,
    SENDING,
    BatchRow,
    ItemRow,
    Store,
    rowcount,
)
from server.batches.validate import Validator, typed
from server.config_upstreams import TIERS_METADATA, parse_places
from server.errors import APIError, server_error
from server.serving import Serving
from server.serving.accounting import ADMIN, Account, Caller
from server.store.keys import ADMIN_OWNER, KeyStore
from server.store.storage import is_transient_storage
from server.wire.openai_chat import completion_body, completion_id
from server.wire.openai_images import ImageEditRequest, images_response

if TYPE_CHECKING:
    from server.job import ImageJob, OutImage
    from server.routing.dispatch import BeforeSend

log = logging.getLogger(__name__)
T = TypeVar("T")

CONCURRENCY = 4  # items in flight at once
ITEM_DEADLINE_S = 24 * 3600.0  # bulk work never spills to the cloud for being late
MAX_ATTEMPTS = 20  # tries of one item that meets a full queue / unready model
MAX_BACKOFF_S = 30.0
POLL_S = 1.0
TRANSIENT = frozenset({429, 503})


class Abandoned(Exception):
    """Storage still refused when the worker stopped: the item is left to the next start."""



def batch_tiers(meta: dict[str, str] | None) -> frozenset[str] | None:
    """The places a batch's metadata allows (checked when the batch was made)."""
    text = (meta or {}).get(TIERS_METADATA)
    return parse_places(text) if text else None

@dataclass(frozen=True)
class Claimed:
    id: int
    batch_id: str
    url: str
    custom_id: str
    body: dict[str, Any]
    attempts: int
    owner: str | None
    tiers: frozenset[str] | None = None  # where its batch's metadata lets it run


class Worker:
    """One loop per process that holds the lease; up to ``concurrency`` items in flight."""

    def __init__(self, store: Store, lease: Lease, serving: Serving, keys: KeyStore,
                 models_settled: Callable[[], bool], *, concurrency: int = CONCURRENCY,
                 stop_wait_s: float = 60.0) -> None:
        """``models_settled``: the models are loaded (or failed to) and the server is not
        stopping, so items may be claimed."""
        self.store = store
        self.lease = lease
        self.holder = store.holder
        self.serving = serving
        self.keys = keys
        self.models_settled = models_settled
        self.validator = Validator(store, serving)
        self.concurrency = concurrency
        self.stop_wait_s = stop_wait_s
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._orphans: set[asyncio.Task[tuple[int, int]]] = set()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = False
        self._main = asyncio.create_task(self._loop(), name="batch-worker")

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        """Let in-flight items finish (bounded); pending ones wait for the next start."""
        self._stopping = True
        self.wake()
        if self._main is not None:  # it ends at its next turn (a long validation may delay it)
            await asyncio.wait({self._main}, timeout=self.stop_wait_s)
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        tasks = list(self._inflight.values())
        if tasks:
            log.info("batch worker: waiting up to %.0f s for %d items in flight",
                     self.stop_wait_s, len(tasks))
            _, late = await asyncio.wait(tasks, timeout=self.stop_wait_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch worker step failed; retrying")
                await asyncio.sleep(1.0)
            await self._sleep(POLL_S)

    async def _step(self) -> None:
        if not self.lease.held:
            self.lease.held = await asyncio.to_thread(self.lease.acquire)
            if not self.lease.held:
                return
            rerun, unknown = await asyncio.to_thread(self.lease.reconcile, None)
            if rerun or unknown:
                log.warning("batch worker: %d interrupted items to re-run, %d sent upstream "
                            "with an unknown outcome", rerun, unknown)
        # One batch's trouble is that batch's: it fails (with its reason), and every other
        # batch, of every key, goes on.
        for batch_id in await asyncio.to_thread(self.validator.pending):
            await self._guarded(batch_id, "validating", self.validator.validate, batch_id)
        for batch_id, final in await asyncio.to_thread(advance, self.store):
            await self._guarded(batch_id, "finalizing", finalize, self.store, batch_id, final)
        slots = self.concurrency - len(self._inflight)
        if slots > 0 and self.models_settled() and not self._stopping:
            for item in await asyncio.to_thread(self._claim, slots):
                task = asyncio.create_task(self._execute(item), name=f"batch-item-{item.id}")
                self._inflight[item.id] = task
                task.add_done_callback(functools.partial(self._done, item.id))

    async def _guarded(self, batch_id: str, doing: str, step: Callable[..., None],
                       *args: Any) -> None:
        """Run one batch's step; an error that is not the storage's (which passes: the
        step is retried next turn) fails that batch alone, with its reason."""
        try:
            await asyncio.to_thread(step, *args)
        except Exception as exc:
            if is_transient_storage(exc):  # a full disk, a locked database: next turn
                log.error("batch %s: storage failed while %s (%s); retrying", batch_id,
                          doing, exc)
                return
            log.exception("batch %s failed while %s", batch_id, doing)
            await asyncio.to_thread(fail_batch, self.store, batch_id, {
                "code": "batch_failed", "line": None, "param": None,
                "message": f"The batch failed on the server while {doing}: "
                           f"{type(exc).__name__}."})

    async def _stored(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Write an item's state, retrying while storage refuses (a full disk): a finished
        result is held here until it is written, never thrown away or failed for it. At
        stop the item is abandoned as ``sending``, to be re-run (or, if it went to a cloud,
        reported unknown) at the next start."""
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(write, *args, **kwargs)
            except Exception as exc:
                if not is_transient_storage(exc):
                    raise
                if self._stopping:
                    raise Abandoned from exc
                log.error("batch worker: storage refused a write (%s); retrying in %.0f s",
                          exc, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    def _done(self, item_id: int, task: asyncio.Task[None]) -> None:
        self._inflight.pop(item_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Its result could not be stored (the database refused for too long): the item
            # must not stay "sending" until the next start.
            log.error("batch item %d: %r; it will be re-run or reported", item_id,
                      task.exception())
            orphan = asyncio.create_task(asyncio.to_thread(self.lease.reconcile, self.holder,
                                                           item_id))
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)
        self.wake()

    def _claim(self, slots: int) -> list[Claimed]:
        now = time.time()
        with self.store.write() as s:
            rows = s.execute(
                select(ItemRow.id, ItemRow.batch_id, ItemRow.url, ItemRow.custom_id,
                       ItemRow.body, ItemRow.attempts, BatchRow.owner, BatchRow.meta)
                .join(BatchRow, BatchRow.id == ItemRow.batch_id)
                .where(BatchRow.status == IN_PROGRESS, ItemRow.state == PENDING,
                       ItemRow.not_before <= now, ItemRow.id.not_in(list(self._inflight)))
                .order_by(BatchRow.seq, ItemRow.line).limit(slots)).all()
            claimed = []
            for r in rows:
                res = s.execute(update(ItemRow).where(ItemRow.id == r.id,
                                                      ItemRow.state == PENDING)
                                .values(state=SENDING, claim=self.holder)
                                .execution_options(synchronize_session=False))
                if rowcount(res) == 1:
                    claimed.append(Claimed(r.id, r.batch_id, r.url, r.custom_id, r.body,
                                           r.attempts, r.owner, batch_tiers(r.meta)))
            s.commit()
        return claimed

    def _record_send(self, item_id: int, provider: str, model: str) -> bool:
        """Committed before the cloud call; False if the item is no longer ours."""
        with self.store.write() as s:
            res = s.execute(update(ItemRow).where(
                ItemRow.id == item_id, ItemRow.state == SENDING, ItemRow.claim == self.holder,
                ItemRow.upstream_provider.is_(None))
                .values(upstream_provider=provider, upstream_model=model, sent_at=time.time())
                .execution_options(synchronize_session=False))
            s.commit()
            return rowcount(res) == 1

    def _finish(self, item_id: int, **values: Any) -> bool:
        with self.store.write() as s:
            res = s.execute(update(ItemRow).where(
                ItemRow.id == item_id, ItemRow.state == SENDING, ItemRow.claim == self.holder)
                .values(claim=None, finished_at=time.time(), **values)
                .execution_options(synchronize_session=False))
            s.commit()
            return rowcount(res) == 1

    def _store_images(self, item_id: int, job: ImageJob, images: list[OutImage]) -> bool:
        data = [{"revised_prompt": None, "seed": im.seed,
                 "b64_json": base64.b64encode(im.data).decode("ascii")} for im in images]
        return self._finish(item_id, state=DONE, status_code=200, response=images_response(
            job, data), request_id="req_" + uuid.uuid4().hex)

    async def _execute(self, item: Claimed) -> None:
        sent: list[str] = []

        async def before_send(provider: str, model: str) -> None:
            # The dispatcher may try a second cloud after a failure: never for a batch item.
            if sent or not await self._stored(self._record_send, item.id, provider, model):
                raise APIError(502, "This batch request was already sent upstream once (or "
                               "is no longer this worker's); it is not sent again.",
                               type="server_error", code="upstream_send_refused")
            sent.append(provider)

        # Until the owner's key is looked up, the row names no key (admin's is "admin").
        caller = (ADMIN if item.owner == ADMIN_OWNER else Caller(None, item.owner))
        account = Account(item.url, str(item.body.get("model") or "auto"),
                          Caller(caller.name, caller.owner, caller.admin, bulk=True),
                          request_id=f"{item.batch_id}/{item.custom_id}"[:128],
                          origin="batch", tiers=item.tiers)
        accounting = self.serving.accounting
        try:
            await self._perform(item, before_send, account)
        except (asyncio.CancelledError, Abandoned):
            await accounting.release(account)
            raise
        except APIError as err:
            if (not sent and err.status in TRANSIENT and err.code != "insufficient_quota"
                    and item.attempts + 1 < MAX_ATTEMPTS):
                delay = min(MAX_BACKOFF_S, 0.5 * 2 ** item.attempts)
                with contextlib.suppress(ValueError):
                    delay = min(MAX_BACKOFF_S,
                                max(delay, float(err.headers.get("Retry-After", ""))))
                await self._stored(self._retry_later, item.id, delay)
                await accounting.release(account)
                return
            await self._stored(self._finish, item.id, state=ITEM_FAILED,
                               status_code=err.status, response=err.body(),
                               error_code=err.code, request_id="req_" + uuid.uuid4().hex)
            account.failed(err)
            await self._close(account)
            return
        except Exception as exc:
            log.exception("batch item %s/%s failed", item.batch_id, item.custom_id)
            failure = server_error(f"The request failed on the server: {type(exc).__name__}.")
            await self._stored(self._finish, item.id, state=ITEM_FAILED, status_code=500,
                               response=failure.body(), error_code=failure.code,
                               request_id="req_" + uuid.uuid4().hex)
            await accounting.release(account)
            return
        await self._close(account)

    async def _close(self, account: Account) -> None:
        """One ledger row per finished item, as the HTTP endpoint writes, and its quota
        counted as used."""
        try:
            await self.serving.accounting.close(account)
        except Exception:
            log.exception("could not write the ledger row of a batch item")

    def _retry_later(self, item_id: int, delay: float) -> None:
        with self.store.write() as s:
            s.execute(update(ItemRow).where(ItemRow.id == item_id, ItemRow.state == SENDING,
                                            ItemRow.claim == self.holder)
                      .values(state=PENDING, claim=None, attempts=ItemRow.attempts + 1,
                              not_before=time.time() + delay)
                      .execution_options(synchronize_session=False))
            s.commit()

    async def _check_owner(self, item: Claimed, account: Account) -> None:
        """The key that made the batch must still be active; its quota is then reserved
        as its HTTP requests' is. The admin key's batches (and an open server's) run
        unmetered."""
        if item.owner is None or item.owner == ADMIN_OWNER:
            return
        info = await asyncio.to_thread(self.keys.by_owner, item.owner)
        if info is None or not info.active:
            shown = f"{info.name!r} " if info is not None else ""
            raise APIError(401, f"The API key {shown}that made this batch has been revoked.",
                           code="invalid_api_key")
        account.caller = Caller.of_key(info, bulk=True)

    async def _perform(self, item: Claimed, before_send: BeforeSend, account: Account
                       ) -> None:
        """Run one item through the serving layer, as its endpoint would; store its
        answer."""
        serving = self.serving
        line = typed(item.url, item.body, serving.images.settings.media)
        if line.chat is not None:
            chat = await serving.chat.job_from(line.chat)
            await self._check_owner(item, account)
            outcome, _ = await serving.chat.run(account, chat, ITEM_DEADLINE_S,
                                                before_send=before_send)
            answer = completion_body(completion_id(), line.chat.model, outcome)
            await self._stored(self._finish, item.id, state=DONE, status_code=200,
                               response=answer, request_id="req_" + uuid.uuid4().hex)
            return
        assert line.image is not None
        job: ImageJob
        if isinstance(line.image, ImageEditRequest):
            # The intake the HTTP route uses: off the event loop, fitted, within the
            # pixel budget (a 429 intake_busy here is retried like a full queue).
            job = await serving.images.edit_job(line.image, [
                (ref, f"images[{i}]") for i, ref in enumerate(line.sources)],
                mask=None if line.mask is None else (line.mask, "mask"))
        else:
            job = serving.images.generation_job(line.image)
        await self._check_owner(item, account)
        images, _ = await serving.images.run(account, job, ITEM_DEADLINE_S,
                                             before_send=before_send)
        await self._stored(self._store_images, item.id, job, images)
