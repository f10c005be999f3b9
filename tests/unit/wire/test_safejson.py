"""Hostile JSON turns into one clean error, never a RecursionError or a bad string."""

from __future__ import annotations

import json

import pytest

from server.wire import safejson


def test_deep_nesting_is_a_clean_error_at_any_depth() -> None:
    for depth in (safejson.MAX_DEPTH + 1, 5_000, 100_000):
        with pytest.raises(safejson.JSONError, match="nested more than"):
            safejson.parse("[" * depth + "]" * depth)
    assert safejson.parse("[" * safejson.MAX_DEPTH + "]" * safejson.MAX_DEPTH)


def test_lone_surrogates_are_refused_in_values_and_keys_with_their_place() -> None:
    with pytest.raises(safejson.JSONError) as err:
        safejson.parse('{"a": [1, "ok", "x\\ud800"]}')
    assert err.value.path == "a[2]" and "\\ud800" in err.value.message
    with pytest.raises(safejson.JSONError) as err:
        safejson.parse('{"k\\udfff": 1}')
    assert err.value.path is not None
    json.dumps(err.value.path, ensure_ascii=False).encode("utf-8")  # safe to send back
    # A proper pair is one character, and fine.
    assert safejson.parse('"\\ud83d\\ude00"') == "\U0001f600"


def test_invalid_json_and_bytes_are_json_errors() -> None:
    for raw in (b"{", b"\xff\xfe{", "nan-ish", b""):
        with pytest.raises(safejson.JSONError):
            safejson.parse(raw)
