"""How a source image should reach an engine worker: as raw RGB bytes over its pipe (what
server/providers/local/work.py does), or in shared memory with only its name on the
pipe. Times a round trip per image (sent, read whole in the child, acknowledged) between
this process and a spawned child, both ways side by side in one run.

    .venv/bin/python -m scripts.pipe_bench [--sizes 512,1024,2048] [--rounds 50]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory


def _view(block: SharedMemory) -> memoryview:
    assert block.buf is not None  # None only once closed
    return block.buf


def _child(conn: Connection) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, payload = message
        if kind == "bytes":
            data = payload
            conn.send(len(data) + data[-1])
        else:  # the name of a shared block and its length: read it whole, as a copy
            block = SharedMemory(name=payload[0])
            try:
                data = bytes(_view(block)[:payload[1]])
            finally:
                block.close()
            conn.send(len(data) + data[-1])


def _check(ack: int, image: bytes) -> None:
    if ack != len(image) + image[-1]:
        raise RuntimeError("the child read another image than was sent")


def _time_bytes(conn: Connection, image: bytes, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        conn.send(("bytes", image))
        _check(conn.recv(), image)
        times.append(time.perf_counter() - t0)
    return times


def _time_shm(conn: Connection, image: bytes, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        block = SharedMemory(create=True, size=len(image))
        try:
            _view(block)[:len(image)] = image
            conn.send(("shm", (block.name, len(image))))
            _check(conn.recv(), image)
        finally:
            block.close()
            block.unlink()
        times.append(time.perf_counter() - t0)
    return times


def _time_shm_reused(conn: Connection, image: bytes, rounds: int) -> list[float]:
    """One block made beforehand and written again each time (a pool's best case)."""
    block = SharedMemory(create=True, size=len(image))
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            _view(block)[:len(image)] = image
            conn.send(("shm", (block.name, len(image))))
            _check(conn.recv(), image)
            times.append(time.perf_counter() - t0)
    finally:
        block.close()
        block.unlink()
    return times


def main(argv: list[str] | None = None) -> list[tuple[int, float, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512,1024,2048", help="square sides, comma-separated")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child, args=(theirs,), daemon=True)
    child.start()
    rows: list[tuple[int, float, float, float]] = []
    try:
        print(f"{'image':>11}{'MB':>7}{'pipe ms':>10}{'shm ms':>10}{'shm reused ms':>15}"
              f"{'best shm / pipe':>17}")
        for side in (int(s) for s in args.sizes.split(",")):
            image = bytes(range(256)) * (side * side * 3 // 256)
            _time_bytes(ours, image, 3)  # warm both paths
            _time_shm(ours, image, 3)
            pipe = statistics.median(_time_bytes(ours, image, args.rounds)) * 1000
            shm = statistics.median(_time_shm(ours, image, args.rounds)) * 1000
            reused = statistics.median(_time_shm_reused(ours, image, args.rounds)) * 1000
            rows.append((side, pipe, shm, reused))
            print(f"{side:>5}x{side:<5}{len(image) / 2**20:>7.1f}{pipe:>10.2f}{shm:>10.2f}"
                  f"{reused:>15.2f}{min(shm, reused) / pipe:>17.2f}")
    finally:
        ours.send(None)
        child.join(10)
    return rows


if __name__ == "__main__":
    main()
