"""Spillway beside LitServe: the same pipeline folder served both ways, the same load,
interleaved rounds, and the bare pipeline in a loop as the ceiling.

    .venv/bin/python scripts/peer_bench.py [--size 64x64] [--steps 1] [--clients 16]
        [--requests 192] [--rounds 3] [--torch-threads 1] [--workers 1]

Each round starts each server afresh in its own process on a free loopback port, sends
``2 x clients`` warm-up requests, then times ``--requests`` more from ``--clients``
concurrent clients (one load generator process, httpx, the same prompts and seeds for both
servers), and stops it; then it times the bare pipeline at batch ``--max-batch``.

- Spillway: ``spillway serve`` with engine worker processes on the CPU
  (``SPILLWAY_ENGINE__DEVICES=cpu``, ``SPILLWAY_CPU_THREADS``), a temporary SQLite ledger,
  the access log as by default (to a file), the vision model off.
- LitServe: a LitAPI that loads the same folder with ``pipelines.sdxl_turbo.SDXLTurbo`` in
  LitServe's inference worker, dynamic batching (``max_batch_size``, ``batch_timeout``), the
  same OpenAI-style JSON body, PNG at Spillway's own setting (``server.media.encode``) and
  base64, as Spillway's worker and HTTP side do between them.
- The ceiling: ``SDXLTurbo.run`` on batches of ``--max-batch`` in this process, no HTTP.

Server CPU is the server's process tree's user+sys time over the timed window (/proc),
per image: "host" is every process of the tree but the model workers (Spillway: the HTTP
process; LitServe: its HTTP server, its queue manager and its launcher), "total" all of
it. The load generator's own CPU is not the server's; ``--per-process`` prints it beside
each process's share. Figures, not assertions.

Needs LitServe: ``pip install 'litserve>=0.2.19'`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.base import ImageItem

try:  # the LitAPI below is defined only where LitServe is installed
    from litserve import LitAPI as _LitAPIBase
except ImportError:  # main() says how to install it
    _LitAPIBase = object

LITSERVE_FLOOR = "0.2.19"
INSTALL_HINT = (f"peer bench: LitServe is not installed: run .venv/bin/pip install "
                f"'litserve>={LITSERVE_FLOOR}' (or pip install -e '.[bench]')")
ROUTE = "/v1/images/generations"  # LitServe gets the same path as Spillway
PROMPTS = ("a red bicycle", "a lighthouse at dusk", "a bowl of lemons", "a snowy street",
           "a paper boat", "a green door", "a cat on a roof", "an old typewriter")
SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent


# -- arguments -------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 64x64")
    width, height = int(m[1]), int(m[2])
    if width % 8 or height % 8 or not (8 <= width <= 2048 and 8 <= height <= 2048):
        raise argparse.ArgumentTypeError(
            f"size {text!r}: each side must be a multiple of 8 in 8..2048")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=(64, 64), help="WIDTHxHEIGHT")
    ap.add_argument("--steps", type=int, choices=range(1, 5), default=1)
    ap.add_argument("--clients", type=_positive, default=16)
    ap.add_argument("--requests", type=_positive, default=192, help="timed, per server and round")
    ap.add_argument("--rounds", type=_positive, default=3)
    ap.add_argument("--torch-threads", type=_positive, default=1, help="per model worker")
    ap.add_argument("--workers", type=_positive, default=1, help="model worker processes")
    ap.add_argument("--max-batch", type=_positive, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.01,
                    help="LitServe's batch_timeout, seconds (Spillway keeps its max_wait_ms)")
    ap.add_argument("--litserve-fast-queue", action="store_true",
                    help="LitServe's ZeroMQ transport (fast_queue=True) instead of its "
                    "default multiprocessing queues")
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="default: SPILLWAY_WEIGHTS_DIR or ./weights")
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--per-process", action="store_true",
                    help="also print each server process's CPU ms per image")
    return ap.parse_args(argv)


# -- server CPU from /proc -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+sys seconds) of one live process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and ')'
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _is_model_worker(pid: int) -> bool:
    """Both servers start their model workers with multiprocessing's spawn."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"spawn_main" in cmdline and b"resource_tracker" not in cmdline


def process_tree(root: int) -> dict[int, float]:
    """CPU seconds so far of ``root`` and all its live descendants, by pid."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdecimal():
            got = _stat(int(entry.name))
            if got is not None:
                parents[int(entry.name)], cpu[int(entry.name)] = got
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in cpu and pid not in tree:
            tree[pid] = cpu[pid]
            todo.extend(child for child, parent in parents.items() if parent == pid)
    return tree


@dataclass(frozen=True)
class CpuSample:
    cpu: dict[int, float]
    workers: frozenset[int]


def sample_cpu(root: int, is_worker: Callable[[int], bool] = _is_model_worker) -> CpuSample:
    tree = process_tree(root)
    return CpuSample(tree, frozenset(pid for pid in tree if is_worker(pid)))


def cpu_between(before: CpuSample, after: CpuSample) -> tuple[float, float]:
    """(host, total) CPU seconds spent between two samples; a process born in between
    counts from zero, one that ended in between is lost (neither server restarts any)."""
    host = total = 0.0
    for pid, now in after.cpu.items():
        spent = max(0.0, now - before.cpu.get(pid, 0.0))
        total += spent
        if pid not in after.workers:
            host += spent
    return host, total


def _role(pid: int, root: int, workers: frozenset[int]) -> str:
    if pid == root:
        return "main"
    if pid in workers:
        return "worker"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "child"
    return "tracker" if b"resource_tracker" in cmdline else "child"


def cpu_by_process(before: CpuSample, after: CpuSample, root: int
                   ) -> list[tuple[str, float]]:
    """(role, CPU seconds) per process of the tree between two samples, busiest first:
    main is the process started, worker a model worker, child any other descendant."""
    spent = [(_role(pid, root, after.workers), max(0.0, now - before.cpu.get(pid, 0.0)))
             for pid, now in after.cpu.items()]
    return sorted(spent, key=lambda r: -r[1])


# -- the load generator (its own process, as real clients are) -------------------------

def request_bodies(count: int, width: int, height: int, steps: int,
                   first_seed: int = 0) -> list[dict[str, object]]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "size": f"{width}x{height}", "n": 1,
             "response_format": "b64_json", "seed": first_seed + i, "steps": steps}
            for i in range(count)]


def check_response(body: dict[str, Any], width: int, height: int) -> None:
    """A real answer: one PNG of the asked size, base64 in ``data[0].b64_json``."""
    import io

    from PIL import Image

    png = base64.b64decode(body["data"][0]["b64_json"])
    if not png.startswith(b"\x89PNG"):
        raise RuntimeError("the answer is not a PNG")
    with Image.open(io.BytesIO(png)) as im:
        if im.size != (width, height):
            raise RuntimeError(f"the answer is {im.size}, not {(width, height)}")


async def _drive(port: int, warm: list[dict[str, object]], timed: list[dict[str, object]],
                 clients: int, size: tuple[int, int], started: Callable[[], None]
                 ) -> tuple[float, list[float], float]:
    """(wall seconds, latencies, this process's CPU seconds) of the timed part."""
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 limits=limits) as http:

        async def client(todo: Iterator[dict[str, object]], check: bool) -> None:
            for body in todo:
                t0 = time.perf_counter()
                r = await http.post(ROUTE, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                latencies.append(time.perf_counter() - t0)
                if check:
                    check_response(r.json(), *size)

        warm_todo = iter(warm)  # connections opened, shapes warmed, every answer checked
        await asyncio.gather(*(client(warm_todo, True) for _ in range(clients)))
        latencies.clear()
        started()
        todo = iter(timed)
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(todo, False) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, time.process_time() - cpu0


def _load_child(conn: Connection, port: int, warm: list[dict[str, object]],
                timed: list[dict[str, object]], clients: int, size: tuple[int, int]) -> None:
    try:
        conn.send(("done", asyncio.run(_drive(port, warm, timed, clients, size,
                                              lambda: conn.send(("started", None))))))
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))


@dataclass(frozen=True)
class Result:
    server: str
    images: int
    wall_s: float
    latencies_s: list[float]
    host_cpu_s: float
    total_cpu_s: float
    processes: tuple[tuple[str, float], ...] = ()
    client_cpu_s: float = 0.0  # the load generator's, for where the machine's CPU went

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def host_ms(self) -> float:
        return self.host_cpu_s * 1000 / max(1, self.images)

    @property
    def total_ms(self) -> float:
        return self.total_cpu_s * 1000 / max(1, self.images)


def measure(name: str, port: int, root_pid: int, args: argparse.Namespace) -> Result:
    """The load against one running server, its process tree's CPU over the timed part."""
    width, height = args.size
    warm = request_bodies(2 * args.clients, width, height, args.steps, first_seed=10_000)
    timed = request_bodies(args.requests, width, height, args.steps)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_load_child,
                       args=(theirs, port, warm, timed, args.clients, args.size))
    proc.start()
    try:
        before: CpuSample | None = None
        while True:
            kind, payload = ours.recv()
            if kind == "started":
                before = sample_cpu(root_pid)
            elif kind == "done":
                after = sample_cpu(root_pid)
                break
            else:
                raise RuntimeError(f"{name}: the load failed: {payload}")
    finally:
        proc.join(30)
    assert before is not None
    wall, latencies, client_cpu = payload
    host, total = cpu_between(before, after)
    return Result(name, args.requests, wall, latencies, host, total,
                  tuple(cpu_by_process(before, after, root_pid)), client_cpu)


# -- the servers -----------------------------------------------------------------------

def free_port() -> int:
    # Not server.tools.bench.free_port: that module imports torch, and every spawned
    # child of this script re-imports it; the load generator must start light.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def running(name: str, cmd: list[str], env: dict[str, str], health: str, log: Path,
            stop_signal: int, timeout_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """A server process in its own session, until it answers ``health`` with 200."""
    import httpx

    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout_s:g} s:\n{_tail(log)}")
            try:
                if httpx.get(health, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(stop_signal)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        with suppress(ProcessLookupError):  # what it left behind: its session is its group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _base_env() -> dict[str, str]:
    # The servers are configured here alone, not by whatever SPILLWAY_* this shell holds.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def spillway_server(port: int, folder: Path, tmp: Path, args: argparse.Namespace
                    ) -> tuple[list[str], dict[str, str], str]:
    width, height = args.size
    env = _base_env() | {
        "SPILLWAY_SDXL_WEIGHTS": str(folder),
        "SPILLWAY_ENGINE__DEVICES": ",".join(["cpu"] * args.workers),
        "SPILLWAY_CPU_THREADS": str(args.torch_threads),
        "SPILLWAY_LEDGER_URL": f"sqlite:///{tmp}/ledger.db",
        "SPILLWAY_VLM__ENABLED": "false",
        "SPILLWAY_BATCH__MAX_BATCH": str(args.max_batch),
        "SPILLWAY_IMAGES__MIN_SIDE": str(min(256, width, height)),
        "SPILLWAY_IMAGES__MAX_SIDE": str(max(1024, width, height)),
    }
    cli = Path(sys.executable).parent / "spillway"
    head = [str(cli)] if cli.exists() else [sys.executable, "-m", "server.cli"]
    cmd = [*head, "serve", "--host", "127.0.0.1", "--port", str(port)]
    return cmd, env, f"http://127.0.0.1:{port}/readyz"


def litserve_server(port: int, folder: Path, variant: str | None, args: argparse.Namespace
                    ) -> tuple[list[str], dict[str, str], str]:
    width, height = args.size
    spec = {"port": port, "folder": str(folder), "variant": variant,
            "threads": args.torch_threads, "workers": args.workers,
            "max_batch": args.max_batch, "batch_timeout": args.batch_timeout,
            "fast_queue": args.litserve_fast_queue,
            "min_side": min(256, width, height), "max_side": max(1024, width, height)}
    cmd = [sys.executable, str(SCRIPT), "_serve-litserve", json.dumps(spec)]
    return cmd, _base_env(), f"http://127.0.0.1:{port}/health"


class PipelineAPI(_LitAPIBase):  # type: ignore[misc]
    """The project's pipeline behind LitServe: decode -> batch -> predict -> encode, all in
    LitServe's inference worker; the same body in and the same bytes out as Spillway."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(max_batch_size=spec["max_batch"], batch_timeout=spec["batch_timeout"],
                         api_path=ROUTE)
        self.conf = spec

    def setup(self, device: str) -> None:
        import torch

        from pipelines.sdxl_turbo import Limits, SDXLTurbo

        torch.set_num_threads(self.conf["threads"])
        self.engine = SDXLTurbo.load(self.conf["folder"], torch.device("cpu"),
                                     variant=self.conf["variant"],
                                     limits=Limits(self.conf["min_side"], self.conf["max_side"]))

    def decode_request(self, request: dict[str, Any], **kwargs: Any) -> ImageItem:
        from fastapi import HTTPException

        from pipelines.base import ImageItem

        try:
            width, height = parse_size(str(request.get("size", "512x512")))
            if request.get("n", 1) != 1 or request.get("response_format") != "b64_json":
                raise ValueError("this bench serves n=1, response_format=b64_json")
            return ImageItem(str(request["prompt"]), int(request.get("seed", 0)), width,
                             height, int(request.get("steps", 1)))
        except (KeyError, ValueError, argparse.ArgumentTypeError) as exc:
            raise HTTPException(400, str(exc)) from exc

    def predict(self, items: list[ImageItem], **kwargs: Any) -> list[Image.Image]:
        # One pipeline call per batch; LitServe batches only when it is handed a list.
        return self.engine.run(items)

    def encode_response(self, image: Image.Image, **kwargs: Any) -> dict[str, object]:
        from server.media.encode import encode_image

        png = encode_image(image, "png", None)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode("ascii")}]}


# LitServe reads these two annotations to choose FastAPI's request and response types;
# left out, as in LitServe's own examples, it means the raw request's JSON in and no
# response model out (annotated, FastAPI would validate the body and the response).
del PipelineAPI.decode_request.__annotations__["request"]
del PipelineAPI.encode_response.__annotations__["return"]


def serve_litserve(spec: dict[str, Any]) -> None:
    import litserve

    server = litserve.LitServer(PipelineAPI(spec), accelerator="cpu",
                                workers_per_device=spec["workers"], timeout=600,
                                fast_queue=spec["fast_queue"])
    server.run(host="127.0.0.1", port=spec["port"], log_level="warning",
               generate_client_file=False)


# -- the ceiling: the pipeline alone ----------------------------------------------------

@dataclass(frozen=True)
class Ceiling:
    images: int
    pipeline_s: float
    encode_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.pipeline_s

    @property
    def with_png_per_s(self) -> float:
        return self.images / (self.pipeline_s + self.encode_s)

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000 / max(1, self.images)


class BarePipeline:
    """The folder loaded once in this process; each ``measure`` times whole batches."""

    def __init__(self, folder: Path, variant: str | None, threads: int,
                 size: tuple[int, int]) -> None:
        import torch
        from diffusers.utils import logging as diffusers_logging

        from pipelines.sdxl_turbo import Limits, SDXLTurbo

        diffusers_logging.disable_progress_bar()  # this process prints the table
        torch.set_num_threads(threads)
        width, height = size
        self.engine = SDXLTurbo.load(folder, torch.device("cpu"), variant=variant,
                                     limits=Limits(min(256, width, height),
                                                   max(1024, width, height)))

    def measure(self, width: int, height: int, steps: int, batch: int, images: int
                ) -> Ceiling:
        from pipelines.base import ImageItem
        from server.media.encode import encode_image

        bodies = request_bodies(max(batch, images), width, height, steps)
        items = [ImageItem(str(b["prompt"]), int(str(b["seed"])), width, height, steps)
                 for b in bodies]
        self.engine.run(items[:batch])  # warm-up
        pipe_s = enc_s = 0.0
        cpu0, done = os.times(), 0
        while done < images:
            chunk = items[done:done + batch] if done + batch <= len(items) else items[:batch]
            t0 = time.perf_counter()
            out = self.engine.run(chunk)
            t1 = time.perf_counter()
            for im in out:
                base64.b64encode(encode_image(im, "png", None))
            pipe_s, enc_s = pipe_s + t1 - t0, enc_s + time.perf_counter() - t1
            done += len(chunk)
        cpu1 = os.times()
        cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
        return Ceiling(done, pipe_s, enc_s, cpu)


# -- the rounds ------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One printed line: a round's figures, or the medians of the rounds column by column."""

    images_per_s: float
    p50_ms: float
    p95_ms: float
    host_ms: float
    total_ms: float

    @staticmethod
    def of(r: Result) -> Row:
        return Row(r.images_per_s, r.pct(0.5), r.pct(0.95), r.host_ms, r.total_ms)

    @staticmethod
    def median(rows: list[Row]) -> Row:
        return Row(*(statistics.median(getattr(r, f) for r in rows)
                     for f in ("images_per_s", "p50_ms", "p95_ms", "host_ms", "total_ms")))


HEADER = (f"{'round':<8}{'server':<10}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'host ms':>11}{'total ms':>11}{'of ceiling':>12}")


def _row(label: str, server: str, r: Row, ceiling: float) -> str:
    return (f"{label:<8}{server:<10}{r.images_per_s:>10.1f}{r.p50_ms:>9.0f}{r.p95_ms:>9.0f}"
            f"{r.host_ms:>11.2f}{r.total_ms:>11.2f}{r.images_per_s / ceiling:>12.2f}")


def _ceiling_rows(label: str, c: Ceiling, batch: int) -> list[str]:
    return [f"{label:<8}{f'bare b{batch}':<10}{c.images_per_s:>10.1f}{'-':>9}{'-':>9}{'-':>11}"
            f"{c.cpu_ms:>11.2f}{1.0:>12.2f}",
            f"{label:<8}{'+png+b64':<10}{c.with_png_per_s:>10.1f}{'-':>9}{'-':>9}{'-':>11}"
            f"{'-':>11}{c.with_png_per_s / c.images_per_s:>12.2f}"]


def load_average() -> str:
    """The 1-minute load average: how much else this machine was doing."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def bench(args: argparse.Namespace) -> int:
    from pipelines.registry import describe
    from server.config import Settings
    from server.providers.local.loading import resolve_weights

    settings = Settings() if args.weights_dir is None else Settings(weights_dir=args.weights_dir)
    try:
        weights = resolve_weights(settings)
    except FileNotFoundError as exc:
        print(f"peer bench: {exc}")
        return 2
    weights = describe(weights.path)  # what its marker says, whatever folder it is
    width, height = args.size
    print(f"peer bench: {weights.path} ({weights.label}), {width}x{height}, {args.steps} "
          f"step(s), {args.clients} clients, {2 * args.clients} warm-up + {args.requests} "
          f"timed requests per server and round, {args.rounds} round(s); torch threads "
          f"{args.torch_threads} x {args.workers} worker(s) each; max batch {args.max_batch} "
          f"(LitServe batch_timeout {args.batch_timeout:g} s"
          f"{', fast_queue' if args.litserve_fast_queue else ''}); {os.cpu_count()} CPUs, "
          f"load average {load_average()}")
    print("host/total ms = server CPU ms per image, host = all but the model workers")
    print(HEADER, flush=True)
    bare = BarePipeline(weights.path, weights.variant, args.torch_threads, args.size)
    runs: dict[str, list[Row]] = {"spillway": [], "litserve": []}
    ceilings: list[Ceiling] = []
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for n in range(1, args.rounds + 1):
            round_results = []
            for name in ("spillway", "litserve"):
                port = free_port()
                if name == "spillway":
                    cmd, env, health = spillway_server(port, weights.path, tmp, args)
                    stop = signal.SIGTERM
                else:
                    cmd, env, health = litserve_server(port, weights.path, weights.variant,
                                                       args)
                    stop = signal.SIGINT
                log = tmp / f"{name}-{n}.log"
                with running(name, cmd, env, health, log, stop, args.start_timeout) as proc:
                    round_results.append(measure(name, port, proc.pid, args))
            c = bare.measure(width, height, args.steps, args.max_batch, args.requests)
            ceilings.append(c)
            for r in round_results:
                runs[r.server].append(Row.of(r))
                print(_row(str(n), r.server, Row.of(r), c.images_per_s), flush=True)
                if args.per_process:
                    print(" " * 8 + "CPU ms/image by process: " + ", ".join(
                        f"{role} {cpu * 1000 / r.images:.2f}" for role, cpu in r.processes)
                        + f"; load generator {r.client_cpu_s * 1000 / r.images:.2f}")
            for line in _ceiling_rows(str(n), c, args.max_batch):
                print(line, flush=True)
    ceiling = Ceiling(ceilings[0].images, *(statistics.median(
        getattr(c, f) for c in ceilings) for f in ("pipeline_s", "encode_s", "cpu_s")))
    medians = {name: Row.median(rows) for name, rows in runs.items()}
    for name, m in medians.items():
        print(_row("median", name, m, ceiling.images_per_s))
    for line in _ceiling_rows("median", ceiling, args.max_batch):
        print(line)
    s, ls_ = medians["spillway"], medians["litserve"]
    print(f"spillway / litserve (medians): {s.images_per_s / ls_.images_per_s:.2f}x images/s, "
          f"host CPU {s.host_ms / ls_.host_ms:.2f}x, total CPU {s.total_ms / ls_.total_ms:.2f}x "
          f"per image; load average {load_average()} at the end")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve-litserve"]:  # this script, as the LitServe server process
        serve_litserve(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    if importlib.util.find_spec("litserve") is None:
        print(INSTALL_HINT)
        return 2
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
