"""Shape buckets, as pure functions: which shapes are compiled, and how a batch of any
size runs as calls of those sizes (pipelines/compiled.py holds the graphs)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

CALL_COST = 2  # items of work a call costs beyond its items (see plan_chunks)


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    batch: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}@{self.batch}"


def parse_buckets(specs: list[str]) -> list[Bucket]:
    """``["512x512@1", "512x512@4"]`` -> buckets; a ValueError quotes a bad one."""
    buckets = []
    for spec in specs:
        size, _, batch = spec.strip().partition("@")
        width, _, height = size.partition("x")
        try:
            bucket = Bucket(int(width), int(height), int(batch))
        except ValueError:
            raise ValueError(f"bucket {spec!r} is not WIDTHxHEIGHT@BATCH, "
                             "e.g. 512x512@8") from None
        if min(bucket.width, bucket.height, bucket.batch) < 1:
            raise ValueError(f"bucket {spec!r} has a size below 1")
        buckets.append(bucket)
    return sorted(set(buckets))


def plan_chunks(n: int, sizes: list[int], cap: int) -> list[tuple[int, int]]:
    """How a batch of ``n`` runs: ``(items, padded size)`` per call.

    ``sizes``: the batch sizes compiled for this shape ([] = eager, no padding); ``cap``:
    the most items one call may hold (the memory budget). Cheapest first, counting a call
    as ``CALL_COST`` items of work on top of its (padded) items (an estimate: a call's
    fixed cost, launches and text encoders, is about two images' work at batch 16): with
    sizes 1, 4, 8, 16, a batch of 20 is 16 + 4, one of 3 is 4 (1 padded), one of 15 is 16,
    one of 11 is 8 + 4."""
    cap = max(1, cap)
    usable = sorted({s for s in sizes if s <= cap})
    if not usable:
        return [(min(cap, n - i), min(cap, n - i)) for i in range(0, n, cap)]
    Plan = tuple[int, int, tuple[tuple[int, int], ...]]  # cost, calls, chunks

    @functools.cache
    def best(left: int) -> Plan:
        options: list[Plan] = []
        for s in usable:
            if s >= left:
                options.append((s + CALL_COST, 1, ((left, s),)))
            else:
                cost, calls, rest = best(left - s)
                options.append((cost + s + CALL_COST, calls + 1, ((s, s), *rest)))
        return min(options)

    return list(best(n)[2]) if n > 0 else []
