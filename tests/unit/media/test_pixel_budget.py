"""The decoded-pixel budget (server/media/budget.py): order, waiting, refusal, release."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.errors import APIError
from server.media.budget import PixelBudget


def test_work_runs_in_a_thread_and_the_room_comes_back() -> None:
    async def main() -> None:
        budget = PixelBudget(100, wait_s=1)
        loop_thread = threading.get_ident()
        ran_in = await budget.run(60, threading.get_ident)
        assert ran_in != loop_thread and budget.in_use == 0

    asyncio.run(main())


def test_images_wait_their_turn_in_order_and_never_exceed_the_budget() -> None:
    async def main() -> None:
        budget = PixelBudget(100, wait_s=5)
        gates = [threading.Event() for _ in range(4)]
        order: list[int] = []
        peak = 0

        def work(i: int) -> int:
            nonlocal peak
            peak = max(peak, budget.in_use)
            order.append(i)
            assert gates[i].wait(5)
            return i

        costs = [60, 60, 10, 1000]  # the small one waits behind the one before it
        tasks = [asyncio.create_task(budget.run(c, lambda i=i: work(i)))
                 for i, c in enumerate(costs)]
        await asyncio.sleep(0.1)
        assert order == [0] and budget.in_use == 60
        for i in range(4):
            gates[i].set()
        assert await asyncio.gather(*tasks) == [0, 1, 2, 3]
        assert order == [0, 1, 2, 3]  # first come, first served
        assert peak <= 100 and budget.in_use == 0  # 1000 was admitted alone, as 100

    asyncio.run(main())


def test_an_image_that_cannot_get_room_in_time_is_refused() -> None:
    async def main() -> None:
        budget = PixelBudget(100, wait_s=0.05)
        gate = threading.Event()
        holder = asyncio.create_task(budget.run(100, lambda: gate.wait(5)))
        await asyncio.sleep(0.02)
        with pytest.raises(APIError) as refused:
            await budget.run(1, lambda: None, param="image")
        err = refused.value
        assert (err.status, err.code, err.param) == (429, "intake_busy", "image")
        assert err.headers["Retry-After"] == "1"
        gate.set()
        await holder
        assert budget.in_use == 0
        assert await budget.run(100, lambda: "ok") == "ok"  # the refused one left no trace

    asyncio.run(main())


def test_a_cancelled_request_holds_its_room_until_its_decode_ends() -> None:
    async def main() -> None:
        budget = PixelBudget(100, wait_s=5)
        gate = threading.Event()
        running = asyncio.create_task(budget.run(80, lambda: gate.wait(5)))
        waiting = asyncio.create_task(budget.run(50, lambda: None))
        await asyncio.sleep(0.05)
        running.cancel()
        waiting.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        # the thread still holds its pixels; the waiter left the queue
        assert budget.in_use == 80
        gate.set()
        for _ in range(100):
            if budget.in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.in_use == 0
        assert await budget.run(100, lambda: 1) == 1

    asyncio.run(main())
