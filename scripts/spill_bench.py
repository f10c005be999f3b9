"""Spillover bench: open-loop load at 3x local capacity, spilling on vs off, side by side.

    .venv/bin/python -m scripts.spill_bench [--seconds 60] [--factor 3] [--size 256x256]
    .venv/bin/python -m scripts.spill_bench --tiers [--deadline-ms 4000]

``--tiers``: three upstreams of different prices, latencies and tiers (an economy relay at
40% of OpenAI's list prices answering in 2 s, a standard one at 70% in 1.5 s, premium
OpenAI at list price in 1 s; each relay may take at most 40% of the offered load a
minute) and a mix of jobs (one in ten asks for quality "high", which goes to the best
tier), against the same load with every image sent to premium: the cost per 1,000 images,
p95 against the deadline, and each upstream's share.

The local engine is the served one (the tiny model unless real weights are present);
OpenAI and Gemini are the loopback fakes from tests/fakes answering in ~2 s, with roomy
rate limits and budgets (the bench measures the router, not the tier-1 limits). Arrivals
are Poisson, independent of completions (open loop), each with a deadline header
(``x-spillway-max-wait-ms``, 1 s unless told). ``late`` is the share of the jobs kept
local that the client got after their deadline (client-side latency, HTTP included):
with spilling on it says whether the router's estimate holds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from multiprocessing.connection import Connection

import uvicorn
from pydantic import SecretStr

from server.app import create_app
from server.config import (
    GeminiSettings,
    OpenAISettings,
    RateLimit,
    RouterSettings,
    Settings,
)
from server.tools.bench import free_port
from server.tools.burst import AccessLines
from tests.fakes.gemini_server import running_fake_gemini
from tests.fakes.openai_server import running_fake_openai


@dataclass
class Outcome:
    latency_s: float
    status: int
    route: str
    cost: float


async def _open_loop(port: int, rate: float, seconds: float, bodies: list[dict[str, object]],
                     deadline_ms: float, closed: bool = False) -> list[Outcome]:
    """``bodies``: the n-th request sends ``bodies[n % len(bodies)]``."""
    import httpx

    out: list[Outcome] = []
    headers = {"x-spillway-max-wait-ms": str(deadline_ms)}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 limits=limits) as http:

        sent = 0

        async def one() -> None:
            nonlocal sent
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            r = await http.post("/v1/images/generations", json=body, headers=headers)
            out.append(Outcome(time.perf_counter() - t0, r.status_code,
                               r.headers.get("x-spillway-route", "-"),
                               float(r.headers.get("x-spillway-cost-usd", 0))))

        if closed:  # capacity probe: 16 clients back to back
            end = time.perf_counter() + seconds

            async def client() -> None:
                while time.perf_counter() < end:
                    await one()

            await asyncio.gather(*(client() for _ in range(16)))
            return out
        rng = random.Random(7)
        tasks = []
        start = time.perf_counter()
        t = 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    return out


def _client(*args: object) -> list[Outcome]:
    return asyncio.run(_open_loop(*args))  # type: ignore[arg-type]


def _fakes_main(conn: Connection, latency_s: float, openai_latencies: list[float]) -> None:
    with ExitStack() as stack:
        gm = stack.enter_context(running_fake_gemini())
        gm.latency_s = latency_s
        fakes = [stack.enter_context(running_fake_openai()) for _ in openai_latencies]
        for fake, seconds in zip(fakes, openai_latencies, strict=True):
            fake.latency_s = seconds
        conn.send((gm.url, [fake.url for fake in fakes]))
        conn.recv()  # until the bench is done


@contextmanager
def _fake_clouds(latency_s: float, openai_latencies: list[float] | None = None
                 ) -> Iterator[tuple[str, list[str]]]:
    """The loopback fakes in a process of their own: the images they make and encode
    must not take the server's CPU (or GIL) from it. Yields Gemini's URL and one OpenAI
    fake's per latency (default: one answering in ``latency_s``)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_fakes_main, daemon=True,
                       args=(theirs, latency_s, openai_latencies or [latency_s]))
    proc.start()
    try:
        yield ours.recv()
    finally:
        ours.send("stop")
        proc.join(15)


def _serve_and_load(settings: Settings, rate: float, seconds: float,
                    bodies: list[dict[str, object]], deadline_ms: float, closed: bool = False,
                    server_side: AccessLines | None = None) -> list[Outcome]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, chat_loader=None),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import httpx

    while True:
        try:
            if server.started and httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    try:
        with (server_side.captured() if server_side is not None else nullcontext()), \
                ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_client, port, rate, seconds, bodies, deadline_ms,
                               closed).result()
    finally:
        server.should_exit = True
        thread.join()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def _capacity(settings: Settings, body: dict[str, object]) -> float:
    probe = _serve_and_load(settings, 0, 8, [body], 86_400_000, closed=True)
    return len([o for o in probe if o.status == 200]) / 8


def _two_clouds(args: argparse.Namespace, body: dict[str, object]) -> None:
    roomy = {m: RateLimit(per_minute=100_000, burst=100_000) for m in
             ("gpt-image-1", "gemini-2.5-flash-image")}
    with _fake_clouds(args.upstream_latency_s) as (gemini_url, (openai_url,)):

        def settings(spill: bool) -> Settings:
            return Settings(
                ledger_url="sqlite://",
                openai=OpenAISettings(api_key=SecretStr("sk-bench-000000000000"),
                                      base_url=f"{openai_url}/v1"),
                gemini=GeminiSettings(api_key=SecretStr("bench-gemini-key"),
                                      base_url=gemini_url),
                router=RouterSettings(spill=spill, rate_limits=roomy,
                                      daily_budget_usd={"total": 1e9}))

        capacity = _capacity(settings(False), body)
        rate = capacity * args.factor
        print(f"spill bench: local capacity {capacity:.1f} images/s at {args.size} "
              f"(16 clients, 8 s); offered load {rate:.1f} req/s open loop for "
              f"{args.seconds:g} s, deadline {args.deadline_ms:g} ms, fake clouds answer in "
              f"{args.upstream_latency_s:g} s")
        rows = []
        for label, spill in (("spill on", True), ("spill off", False)):
            seen = AccessLines()
            outcomes = _serve_and_load(settings(spill), rate, args.seconds, [body],
                                       args.deadline_ms, server_side=seen)
            ok = [o for o in outcomes if o.status == 200]
            routes = Counter(o.route for o in ok)
            spilled = sum(n for r, n in routes.items() if r not in ("local", "-"))
            local = [o for o in ok if o.route == "local"]
            late = sum(o.latency_s * 1000 > args.deadline_ms for o in local) / max(1, len(local))
            served_here = [float(str(line["latency_ms"])) for line in seen.fields
                           if line.get("route") == "local" and line.get("status") == 200]
            late_server = sum(ms > args.deadline_ms for ms in served_here) / max(
                1, len(served_here))
            rows.append((label, len(outcomes), len(ok), _pct([o.latency_s for o in ok], 0.5),
                         _pct([o.latency_s for o in ok], 0.95),
                         spilled / max(1, len(ok)), sum(o.cost for o in ok),
                         len(outcomes) - len(ok), len(local), late, late_server))
        print(f"{'mode':<10}{'sent':>7}{'ok':>7}{'p50 ms':>9}{'p95 ms':>9}{'spilled':>9}"
              f"{'cost $':>9}{'refused':>9}{'local':>7}{'late':>7}{'late@srv':>10}")
        for label, sent, ok_n, p50, p95, share, cost, refused, n_local, late, srv in rows:
            print(f"{label:<10}{sent:>7}{ok_n:>7}{p50:>9.0f}{p95:>9.0f}{share:>9.0%}"
                  f"{cost:>9.2f}{refused:>9}{n_local:>7}{late:>7.1%}{srv:>10.1%}")
        on, off = rows
        print(f"p50 latency spill on / off: {on[3] / max(off[3], 1):.2f}x; "
              f"requests refused: {on[7]} vs {off[7]}")


# name, kind, tier, list-price factor, answer latency (s), share of the offered load a
# minute its rate limit admits (None: roomy)
TIERED = [("relay", "economy", 0.4, 2.0, 0.4), ("standard", "standard", 0.7, 1.5, 0.4),
          ("premium", "premium", 1.0, 1.0, None)]


def _tiers(args: argparse.Namespace, body: dict[str, object]) -> None:
    high = {**body, "quality": "high"}
    mix = [body] * 9 + [high]  # one job in ten asks for a critical quality
    with _fake_clouds(1.0, [t[3] for t in TIERED]) as (_, urls):

        def settings(rate: float, only_premium: bool = False) -> Settings:
            ups = []
            for (name, tier, factor, _, share), url in zip(TIERED, urls, strict=True):
                if only_premium and tier != "premium":
                    continue
                per_minute = 100_000 if share is None else max(1, int(rate * share * 60))
                ups.append({"name": name, "tier": tier, "base_url": f"{url}/v1",
                            "kind": "openai" if tier == "premium" else "openai-compatible",
                            "api_key": "sk-bench-000000000000", "prices": {"factor": factor},
                            "rate_limits": {"gpt-image-1": {
                                "per_minute": per_minute, "burst": max(1, per_minute // 6)}}})
            return Settings(ledger_url="sqlite://", upstreams=ups,
                            router=RouterSettings(daily_budget_usd={"total": 1e9}))

        capacity = _capacity(settings(1.0), body)
        rate = capacity * args.factor
        print(f"spill bench, tiers: local capacity {capacity:.1f} images/s at {args.size}; "
              f"offered {rate:.1f} req/s open loop for {args.seconds:g} s, deadline "
              f"{args.deadline_ms:g} ms; one job in ten asks for quality high")
        print("upstreams: " + "; ".join(
            f"{n} ({t}, {f:.0%} of list, {lat:g} s"
            + (f", at most {s:.0%} of the load)" if s else ")")
            for n, t, f, lat, s in TIERED))
        runs = [("tiered", settings(rate), mix),
                ("all premium", settings(rate, only_premium=True),
                 [{**b, "model": "gpt-image-1"} for b in mix])]
        print(f"{'run':<13}{'sent':>6}{'ok':>6}{'p50 ms':>8}{'p95 ms':>8}{'$ / 1000':>10}"
              f"  share per route")
        for label, cfg, bodies in runs:
            outcomes = _serve_and_load(cfg, rate, args.seconds, bodies, args.deadline_ms)
            ok = [o for o in outcomes if o.status == 200]
            routes = Counter(o.route for o in ok)
            share = ", ".join(f"{r} {n / max(1, len(ok)):.0%}" for r, n in routes.most_common())
            per_1000 = 1000 * sum(o.cost for o in ok) / max(1, len(ok))
            print(f"{label:<13}{len(outcomes):>6}{len(ok):>6}"
                  f"{_pct([o.latency_s for o in ok], 0.5):>8.0f}"
                  f"{_pct([o.latency_s for o in ok], 0.95):>8.0f}{per_1000:>10.2f}  {share}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--factor", type=float, default=3.0, help="load / local capacity")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--deadline-ms", type=float, default=None,
                    help="default: 1000 (4000 with --tiers, above the upstreams' latency)")
    ap.add_argument("--upstream-latency-s", type=float, default=2.0)
    ap.add_argument("--tiers", action="store_true",
                    help="three upstreams of different prices and tiers (see above)")
    args = ap.parse_args()
    if args.deadline_ms is None:
        args.deadline_ms = 4000.0 if args.tiers else 1000.0
    body: dict[str, object] = {"prompt": "a red bicycle", "size": args.size}
    (_tiers if args.tiers else _two_clouds)(args, body)


if __name__ == "__main__":
    main()
