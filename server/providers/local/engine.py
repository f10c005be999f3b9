"""Engine workers, the server's side: one child process per device, each a ``Runner`` of
the batcher (server/providers/local/runner.py). The batcher's thread for a worker hands
it a formed batch and waits for its encoded images; nothing of the pipeline, no torch
work and no pixel encoding runs in the server's process.

A worker that dies (SIGKILL, a segfault, a poisoned CUDA context) fails only the batch it
had; the thread then starts a new one, and while it loads the worker is not ``ready``, so
the estimates count one device fewer and the router spills or refuses honestly. Workers
exit when the server does, even when it is killed: their end of the pipe closes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from server.providers.local.engine_child import EngineSpec, main
from server.providers.local.work import Failed, ImageWork, Loaded, Ran, RunBatch, Stop, WireItem

log = logging.getLogger(__name__)

# CUDA cannot be forked, and a fork would copy the server's threads and locks: spawn.
_SPAWN = multiprocessing.get_context("spawn")
# Workers are started with CUDA_VISIBLE_DEVICES naming their GPU; the environment a
# spawned child inherits is the process's, so starts take turns setting it.
_ENV_LOCK = threading.Lock()


class WorkerDied(RuntimeError):
    """The worker process ended (or must end) while it had a batch. The batch was not at
    fault as far as anyone knows: the batcher runs it again, once, on the next free
    worker (the pipeline is deterministic per seed, so nothing is done twice that shows)."""

    retry_elsewhere = True


class EngineProcess:
    """One engine worker process and the pipe to it."""

    def __init__(self, spec: EngineSpec, name: str, *, load_timeout_s: float = 600.0,
                 batch_timeout_s: float = 600.0, stop_timeout_s: float = 30.0) -> None:
        self.spec = spec
        self.name = name
        self.load_timeout_s = load_timeout_s
        # A worker that neither answers nor dies (a hung kernel) is killed after this:
        # its batch then runs elsewhere, as if it had died.
        self.batch_timeout_s = batch_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._ready = False
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.description = ""
        self.load_error: str | None = None
        self.restarts = 0
        self.batches = 0
        self.items = 0
        self.busy_s = 0.0  # time with a batch in hand: items / busy_s is its rate
        self.busy = False  # a batch in hand now
        self._broken = False  # died, or said its context is poisoned: start a new one
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False

    @property
    def ready(self) -> bool:
        """Takes work now: loaded, and its process still there (one that died while idle
        stops counting at once, and its batcher thread starts it again)."""
        return self._ready and self._proc is not None and self._proc.is_alive()

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the process and wait until its pipeline is loaded; a worker that cannot
        load says why in ``load_error`` (and raises)."""
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
        self._proc, self._conn = proc, ours
        answer = self._wait(self.load_timeout_s)
        if isinstance(answer, Loaded):
            self.description, self.load_error = answer.description, None
            self.ready, self.state = True, "ready"
            log.info("%s: loaded (%s)", self.name, answer.description)
            return
        died = self._proc is not None and not self._proc.is_alive()
        code = self._proc.exitcode if self._proc is not None else None
        self._reap()
        self.state = "failed"
        self.load_error = (answer.message if isinstance(answer, Failed) else
                           f"the worker exited while loading (exit code {code})" if died
                           else f"no answer within {self.load_timeout_s:g} s")
        raise RuntimeError(f"{self.name} could not load {self.spec.folder} on "
                           f"{self.spec.device}: {self.load_error}")

    def recover(self) -> None:
        """A worker that died (or must not go on) starts again. One that never loaded, or
        whose last restart failed, stays out (``state`` failed): no loop of doomed starts."""
        if self._closed or self.state == "failed" or not (
                self._broken or self._proc is None or not self._proc.is_alive()):
            return
        self._broken = False
        self.ready, self.state = False, "restarting"
        self._reap()
        self.restarts += 1
        log.warning("%s: restarting (restart %d)", self.name, self.restarts)
        self.start()

    def close(self) -> None:
        """Stop: the worker finishes nothing new (the batcher has drained), exits."""
        self._closed = True
        self.ready, self.state = False, "stopped"
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):  # already gone: nothing to stop
                self._conn.send(Stop())
        if self._proc is not None:
            self._proc.join(self.stop_timeout_s)
        self._reap()

    def _reap(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    # -- work ----------------------------------------------------------------------------
    def run(self, works: list[ImageWork]) -> list[bytes]:
        conn = self._conn
        if conn is None or not self.ready:
            raise WorkerDied(f"{self.name} is not running")
        started = time.monotonic()
        self.busy = True
        try:
            conn.send(RunBatch([WireItem.of(w) for w in works]))
            answer = self._wait(self.batch_timeout_s)
        except (OSError, ValueError) as exc:
            self.ready, self._broken = False, True
            raise WorkerDied(f"{self.name} is gone ({type(exc).__name__})") from None
        finally:
            self.busy = False
        self.busy_s += time.monotonic() - started
        if isinstance(answer, Ran):
            self.batches += 1
            self.items += len(works)
            return answer.images
        if isinstance(answer, Failed):
            if answer.fatal:  # its CUDA context is unusable: it exits and starts afresh
                self.ready, self._broken = False, True
                raise WorkerDied(f"{self.name}: {answer.message}")
            raise RuntimeError(answer.message)
        self.ready, self._broken = False, True
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
            raise WorkerDied(f"the engine worker {self.name} did not answer within "
                             f"{self.batch_timeout_s:g} s and was stopped")
        code = proc.exitcode if proc is not None else None
        raise WorkerDied(f"the engine worker {self.name} died during the batch"
                         + (f" (exit code {code})" if code is not None else ""))

    def _wait(self, timeout_s: float | None) -> Loaded | Ran | Failed | None:
        """The worker's next answer; None when it died (or ``timeout_s`` passed)."""
        conn, proc = self._conn, self._proc
        assert conn is not None and proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            # Asked before polling: whatever it sent before it ended is read first.
            alive = proc.is_alive()
            try:
                if conn.poll(0.2):
                    answer = conn.recv()
                    if isinstance(answer, Loaded | Ran | Failed):
                        return answer
                    continue
            except (EOFError, OSError):
                return None
            if not alive:
                return None
        return None
