"""Engine workers, the server's side: one child process per device, each a ``Runner`` of
the batcher (server/providers/local/runner.py). The batcher's thread for a worker hands
it a formed batch and waits for its answer; nothing of a model, no torch work and no
pixel encoding runs in the server's process. ``EngineProcess`` runs the image pipeline
(encoded images back), ``ChatProcess`` the vision-language model (text streamed back as
it is produced; a row whose client left is stopped in the worker).

A worker that dies (SIGKILL, a segfault, a poisoned CUDA context) fails only the batch it
had; its batcher thread then has it started again (on a thread of its own: nothing waits
for a load), and while it loads it is not ``ready``, so the estimates count one device
fewer and the router spills or refuses honestly. A worker whose start fails is tried
again after 1, 2, 4 ... s (capped): a weights folder fixed later is picked up. Workers
exit when the server does, even when it is killed: their end of the pipe closes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from pipelines.base import NotFinite
from pipelines.vlm import ChatItem, ChatResult
from server.providers.local.engine_child import EngineSpec, main
from server.providers.local.work import (
    Answered,
    Cancel,
    Failed,
    ImageWork,
    Loaded,
    Message,
    Ran,
    RunBatch,
    RunChat,
    Stop,
    Text,
    WireChat,
    WireItem,
)

log = logging.getLogger(__name__)

# CUDA cannot be forked, and a fork would copy the server's threads and locks: spawn.
_SPAWN = multiprocessing.get_context("spawn")
# Workers are started with CUDA_VISIBLE_DEVICES naming their GPU; the environment a
# spawned child inherits is the process's, so starts take turns setting it.
_ENV_LOCK = threading.Lock()


class WorkerDied(RuntimeError):
    """The worker process ended (or must end) while it had a batch. The batch was not at
    fault as far as anyone knows: the batcher runs it again, once, on the next free
    worker (the models are deterministic per seed, so nothing is done twice that shows),
    unless ``retry_elsewhere`` was turned off. ``retry_rows``: the rows that may run
    again (None: all); a row that had already streamed text is not among them."""

    retry_elsewhere = True
    retry_rows: frozenset[int] | None = None


class EngineWorker:
    """One engine worker process and the pipe to it: start, restart, stop, one exchange
    at a time. ``retry_base_s`` / ``retry_cap_s``: the backoff between failed starts."""

    def __init__(self, spec: EngineSpec, name: str, *, load_timeout_s: float = 600.0,
                 batch_timeout_s: float = 600.0, stop_timeout_s: float = 30.0,
                 retry_base_s: float = 1.0, retry_cap_s: float = 60.0) -> None:
        self.spec = spec
        self.name = name
        self.load_timeout_s = load_timeout_s
        # A worker that neither answers nor dies (a hung kernel) is killed after this:
        # its batch then runs elsewhere, as if it had died.
        self.batch_timeout_s = batch_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self._ready = False
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.description = ""
        self.load_error: str | None = None
        self.restarts = 0  # starts after the first, failed ones included
        self.batches = 0
        self.items = 0
        self.busy_s = 0.0  # time with a batch in hand: items / busy_s is its rate
        self.busy = False  # a batch in hand now
        self._broken = False  # died, or said its context is poisoned: start a new one
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False
        self._lock = threading.Lock()  # _proc, _conn, _closed, _restarter
        self._failures = 0  # failed starts in a row
        self._next_try = 0.0  # monotonic time of the next start of a failed worker
        self.retry_in_s = 0.0  # the backoff its last failed start set
        self._restarter: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        """Takes work now: loaded, and its process still there (one that died while idle
        stops counting at once, and its batcher thread starts it again)."""
        proc = self._proc
        return self._ready and proc is not None and proc.is_alive()

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the process and wait until its model is loaded; a worker that cannot
        load says why in ``load_error`` (and raises), and is tried again by ``recover``
        after the backoff."""
        ours, theirs = _SPAWN.Pipe()
        proc = _SPAWN.Process(target=main, args=(theirs, self.spec, os.getpid()),
                              name=f"spillway-{self.name}", daemon=True)
        with _ENV_LOCK:
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            if self.spec.device.startswith("cuda"):
                os.environ["CUDA_VISIBLE_DEVICES"] = self.spec.device.partition(":")[2] or "0"
            try:
                proc.start()
            finally:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        theirs.close()  # ours is now the only end here: the child's death closes the pipe
        with self._lock:
            self._proc, self._conn = proc, ours
            closed = self._closed  # close() came first: this one is not waited for
        started = time.monotonic()
        answer = None if closed else self._wait(self.load_timeout_s)
        with self._lock:
            if isinstance(answer, Loaded) and not self._closed:
                self.description, self.load_error = answer.description, None
                self.ready, self.state = True, "ready"
                self._failures = 0
                log.info("%s: loaded (%s)", self.name, answer.description)
                return
        if answer is None and not closed and time.monotonic() - started < self.load_timeout_s:
            proc.join(2)  # it died: its pipe closed a moment before it could be reaped
        code = proc.exitcode
        self._reap()
        if self._closed:
            raise RuntimeError(f"{self.name} was stopped while it loaded")
        self._failures += 1
        self.retry_in_s = min(self.retry_cap_s, self.retry_base_s * 2 ** (self._failures - 1))
        self._next_try = time.monotonic() + self.retry_in_s
        self.state = "failed"
        self.load_error = (answer.message if isinstance(answer, Failed) else
                           f"the worker exited while loading (exit code {code})"
                           if code is not None else
                           f"no answer within {self.load_timeout_s:g} s")
        raise RuntimeError(f"{self.name} could not load {self.spec.folder} on "
                           f"{self.spec.device}: {self.load_error}")

    def recover(self) -> None:
        """Called by the batcher thread after a failed batch and while the worker is down;
        never blocks. A worker that died (or must not go on) starts again at once, on a
        thread of its own; one whose start failed starts again once its backoff is over
        (``retry_base_s``, doubling, at most ``retry_cap_s``): no loop of doomed starts."""
        with self._lock:
            if self._closed or (self._restarter is not None and self._restarter.is_alive()):
                return
            if self.state == "failed":
                if time.monotonic() < self._next_try:
                    return
            elif not (self._broken or self._proc is None or not self._proc.is_alive()):
                return
            self._broken = False
            self.ready, self.state = False, "restarting"
            self.restarts += 1
            self._restarter = threading.Thread(target=self._restart, daemon=True,
                                               name=f"restart-{self.name}")
            self._restarter.start()

    def _restart(self) -> None:
        self._reap()
        log.warning("%s: restarting (restart %d)", self.name, self.restarts)
        try:
            self.start()
        except Exception as exc:  # noqa: BLE001 - said in one line; tried again later
            if not self._closed:
                log.error("%s (tried again in %g s)", exc, self.retry_in_s)

    def close(self) -> None:
        """Stop: the worker finishes nothing new (the batcher has drained), exits. One
        that is still loading is killed: nothing waits for a load to finish."""
        with self._lock:
            self._closed = True
            restarter, conn, proc = self._restarter, self._conn, self._proc
            loaded = self._ready
        self.ready, self.state = False, "stopped"
        if loaded and conn is not None and proc is not None:
            with contextlib.suppress(OSError, ValueError):  # already gone: nothing to stop
                conn.send(Stop())
            proc.join(self.stop_timeout_s)
        self._reap()
        if restarter is not None:
            restarter.join(10)

    def _reap(self) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    # -- work ----------------------------------------------------------------------------
    def _exchange(self, request: Message, on_message: Callable[[Message], None] | None = None,
                  tick: Callable[[Connection], None] | None = None, poll_s: float = 0.2
                  ) -> Ran | Answered:
        """Send one batch, wait for its answer; ``on_message`` hears what comes before it
        (streamed text), ``tick`` runs between reads (to tell the worker of a cancel)."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None or not self.ready:
            raise WorkerDied(f"{self.name} is not running")
        started = time.monotonic()
        self.busy = True
        try:
            conn.send(request)
            answer = self._wait(self.batch_timeout_s, on_message, tick, poll_s)
        except (OSError, ValueError) as exc:
            self.ready, self._broken = False, True
            raise WorkerDied(f"{self.name} is gone ({type(exc).__name__})") from None
        finally:
            self.busy = False
        self.busy_s += time.monotonic() - started
        if isinstance(answer, Ran | Answered):
            self.batches += 1
            return answer
        if isinstance(answer, Failed):
            if answer.fatal:  # its CUDA context is unusable: it exits and starts afresh
                self.ready, self._broken = False, True
                raise WorkerDied(f"{self.name}: {answer.message}")
            raise RuntimeError(answer.message)
        self.ready, self._broken = False, True
        if time.monotonic() - started >= self.batch_timeout_s and proc.is_alive():
            proc.kill()
            raise WorkerDied(f"the engine worker {self.name} did not answer within "
                             f"{self.batch_timeout_s:g} s and was stopped")
        proc.join(2)  # its pipe closed a moment before it could be reaped
        code = proc.exitcode
        raise WorkerDied(f"the engine worker {self.name} died during the batch"
                         + (f" (exit code {code})" if code is not None else ""))

    def _wait(self, timeout_s: float, on_message: Callable[[Message], None] | None = None,
              tick: Callable[[Connection], None] | None = None, poll_s: float = 0.2
              ) -> Loaded | Ran | Answered | Failed | None:
        """The worker's next answer; None when it died (or ``timeout_s`` passed)."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            return None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Asked before polling: whatever it sent before it ended is read first.
            alive = proc.is_alive()
            try:
                if tick is not None and alive:
                    tick(conn)
                if conn.poll(poll_s):
                    answer = conn.recv()
                    if isinstance(answer, Loaded | Ran | Answered | Failed):
                        return answer
                    if on_message is not None:
                        on_message(answer)
                    continue
            except (EOFError, OSError, ValueError):
                return None
            if not alive:
                return None
        return None


class EngineProcess(EngineWorker):
    """An image worker: a batch of images in, encoded bytes out."""

    def run(self, works: list[ImageWork]) -> list[bytes | NotFinite]:
        answer = self._exchange(RunBatch([WireItem.of(w) for w in works]))
        if not isinstance(answer, Ran):
            raise RuntimeError(f"{self.name} answered {type(answer).__name__} to images")
        self.items += len(works)
        return answer.images


class ChatProcess(EngineWorker):
    """A vision-language worker: a batch of conversations in, answers out; each streaming
    row's text reaches its ``on_text`` as the worker produces it, and a row whose
    ``cancel`` is set is stopped in the worker at its next token."""

    def __init__(self, spec: EngineSpec, name: str, **kw: float) -> None:
        if spec.kind != "vlm":
            raise ValueError(f"{name}: a chat worker loads kind 'vlm', not {spec.kind!r}")
        super().__init__(spec, name, **kw)
        self._batch_no = 0

    def run(self, items: list[ChatItem]) -> list[ChatResult]:
        self._batch_no += 1
        batch = self._batch_no
        streamed: set[int] = set()
        told: set[int] = set()

        def on_message(msg: Message) -> None:
            if not isinstance(msg, Text) or not 0 <= msg.row < len(items) or not msg.piece:
                return
            on_text = items[msg.row].on_text
            if on_text is not None:
                streamed.add(msg.row)
                try:
                    on_text(msg.piece)
                except Exception:  # its client's loop is gone: the batch reads on
                    log.exception("%s: a streamed piece could not be delivered", self.name)

        def tick(conn: Connection) -> None:
            for row, item in enumerate(items):
                if row not in told and item.cancel is not None and item.cancel.is_set():
                    told.add(row)
                    conn.send(Cancel(batch, row))

        try:
            answer = self._exchange(RunChat(batch, [WireChat.of(i) for i in items]),
                                    on_message, tick, poll_s=0.05)
        except WorkerDied as exc:
            # Text already sent cannot be taken back: a re-run would send it twice, so
            # those rows fail (their streams end with an error event); the others of
            # the batch run again.
            if streamed:
                exc.retry_rows = frozenset(range(len(items))) - streamed
            raise
        if not isinstance(answer, Answered) or len(answer.results) != len(items):
            raise RuntimeError(f"{self.name} answered {type(answer).__name__} to a chat batch")
        self.items += len(items)
        return answer.results
