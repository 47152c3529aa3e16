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
