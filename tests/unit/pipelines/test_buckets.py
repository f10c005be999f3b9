"""Shape buckets: parsing what the operator wrote, and running any batch size as calls of
compiled sizes within the memory budget."""

from __future__ import annotations

import pytest

from pipelines.buckets import Bucket, parse_buckets, plan_chunks

SIZES = [1, 4, 8, 16]


def test_buckets_parse_sorted_and_deduplicated() -> None:
    assert parse_buckets(["512x512@8", "512x512@1", " 768x512@4 ", "512x512@8"]) == [
        Bucket(512, 512, 1), Bucket(512, 512, 8), Bucket(768, 512, 4)]


@pytest.mark.parametrize("bad", ["512x512", "512@4", "axb@1", "512x512@0", ""])
def test_a_bad_bucket_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="bucket"):
        parse_buckets([bad])


@pytest.mark.parametrize("n", range(1, 70))
def test_every_batch_is_covered_by_compiled_sizes_only(n: int) -> None:
    plan = plan_chunks(n, SIZES, cap=1 << 30)
    assert sum(items for items, _ in plan) == n
    assert all(padded in SIZES and 1 <= items <= padded for items, padded in plan)
    # padding is only ever the smallest compiled size above what is left
    assert sum(padded - items for items, padded in plan) < 8


def test_padding_beats_many_small_calls_and_big_batches_split() -> None:
    assert plan_chunks(3, SIZES, 1 << 30) == [(3, 4)]
    assert plan_chunks(15, SIZES, 1 << 30) == [(15, 16)]
    assert sorted(plan_chunks(20, SIZES, 1 << 30)) == [(4, 4), (16, 16)]
    assert plan_chunks(16, SIZES, 1 << 30) == [(16, 16)]


def test_the_memory_cap_bounds_every_call() -> None:
    assert all(padded <= 8 for _, padded in plan_chunks(40, SIZES, cap=8))
    assert all(padded <= 5 for _, padded in plan_chunks(40, SIZES, cap=5))  # 4s and 1s
    # eager (no compiled sizes): plain chunks of the cap, no padding
    assert plan_chunks(20, [], cap=8) == [(8, 8), (8, 8), (4, 4)]
    assert plan_chunks(3, [], cap=1 << 30) == [(3, 3)]
    assert plan_chunks(0, SIZES, cap=8) == []
