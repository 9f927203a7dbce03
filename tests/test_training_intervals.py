"""Sorted disjoint ``[start, end)`` intervals (the ledger's pool, the journal's replay) against
a set of positions."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from curtail.training.intervals import add_interval, remove_interval


def positions(intervals: list[list[int]]) -> set[int]:
    return {p for start, end in intervals for p in range(start, end)}


def test_by_hand() -> None:
    pool = [[0, 10], [20, 30]]
    add_interval(pool, 10, 20)  # touches both: one piece
    assert pool == [[0, 30]]
    remove_interval(pool, 5, 25)
    assert pool == [[0, 5], [25, 30]]
    add_interval(pool, 40, 50)
    add_interval(pool, 3, 27)  # overlaps both
    assert pool == [[0, 30], [40, 50]]
    remove_interval(pool, 0, 100)
    assert pool == []


OPERATIONS = st.lists(
    st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 20)), max_size=40
)


@given(OPERATIONS)
def test_same_positions_as_a_set_and_always_sorted_disjoint_merged(operations) -> None:
    intervals: list[list[int]] = []
    expected: set[int] = set()
    for add, start, length in operations:
        span = set(range(start, start + length))
        if add:
            add_interval(intervals, start, start + length)
            expected |= span
        else:
            remove_interval(intervals, start, start + length)
            expected -= span
        assert positions(intervals) == expected
        assert all(start < end for start, end in intervals)
        # sorted, and a gap between neighbours (touching pieces are merged)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(intervals))
