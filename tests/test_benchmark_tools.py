"""The benchmark scripts' own arithmetic, on the CPU."""

import pytest

from benchmarks.profile_step import time_added


def test_time_added_counts_overlapping_kernels_once():
    # a programmatic-dependent chain: b starts inside a, c after an idle gap, d wholly inside c, a second b later
    events = [(5.0, 12.0, "b"), (0.0, 10.0, "a"), (13.0, 20.0, "c"), (14.0, 16.0, "d"), (19.0, 23.0, "b")]
    added, idle = time_added(events)
    assert added == pytest.approx({"a": 10.0, "b": 2.0 + 3.0, "c": 7.0, "d": 0.0})
    assert idle == pytest.approx(1.0)
    assert sum(added.values()) + idle == pytest.approx(23.0)  # the span


def test_time_added_of_nothing():
    assert time_added([]) == ({}, 0.0)


def test_summarize_trace_puts_each_kind_of_step_against_its_floor():
    from benchmarks.throughput import summarize_trace

    shape = {"kv_bytes_per_token": 10.0, "weight_bytes": 1000.0}
    # (start, sequences, tokens, KV tokens): a prefill of two prompts, then decode steps of 2 and 1 sequences
    trace = [(0.0, 2, 300, 300), (1.0, 2, 2, 302), (1.5, 2, 2, 304), (2.0, 1, 1, 153)]
    rows = {r["steps"]: r for r in summarize_trace(trace, end=2.25, shape=shape, bandwidth=1e4)}
    assert set(rows) == {"prefill", "decode 1+"}
    decode = rows["decode 1+"]
    assert (decode["count"], decode["seconds"]) == (3, 1.25)
    floor = ((302 + 304 + 153) * 10.0 + 3 * 1000.0) / 1e4  # KV and weights read once a step
    assert decode["floor_s"] == pytest.approx(floor, abs=1e-3)
    assert decode["of_floor"] == pytest.approx(floor / 1.25, abs=1e-3)
    assert decode["over_floor_ms"] == pytest.approx(1e3 * (1.25 - floor) / 3, abs=1e-3)
    assert rows["prefill"]["seconds"] == 1.0 and rows["prefill"]["floor_s"] != rows["prefill"]["floor_s"]  # NaN
    assert "floor_s" not in summarize_trace(trace, end=2.25)[0]  # without a shape: times only
    nan = summarize_trace(trace, end=2.25, shape=shape, bandwidth=None)[0]  # no GPU: no bandwidth measured
    assert nan["floor_s"] != nan["floor_s"] and nan["seconds"] == 1.25

