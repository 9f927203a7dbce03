"""Half-open integer intervals ``[start, end)`` kept as a sorted list of disjoint pieces.

The data ledger's free pool and the ledger journal's replay (``curtail.runtime.checkpoint``)
both keep token positions of one epoch this way: a ``list[list[int]]`` of ``[start, end)``
pairs, sorted, disjoint, and merged where they touch. The functions update the list in place
(the pieces are lists so that a caller may shorten the first one in place, as
``DataLedger.claim`` does).

Across epochs a token range is always written ``(epoch, start, end)``, in that order: the
ledger's :class:`~curtail.training.ledger.TokenRange`, its checkpoint, the journal and the
run's events.

Example::

    pool = [[0, 10], [20, 30]]
    add_interval(pool, 10, 20)       # pool == [[0, 30]]
    remove_interval(pool, 5, 25)     # pool == [[0, 5], [25, 30]]
"""

from __future__ import annotations

import bisect


def add_interval(intervals: list[list[int]], start: int, end: int) -> None:
    """Add ``[start, end)``, merging every piece it overlaps or touches."""
    if start >= end:
        return
    first = bisect.bisect_left(intervals, start, key=lambda piece: piece[1])  # first end >= start
    last = bisect.bisect_right(intervals, end, key=lambda piece: piece[0])  # after the last start <= end
    if first < last:
        start = min(start, intervals[first][0])
        end = max(end, intervals[last - 1][1])
    intervals[first:last] = [[start, end]]


def remove_interval(intervals: list[list[int]], start: int, end: int) -> None:
    """Remove ``[start, end)``, cutting the pieces it overlaps."""
    if start >= end:
        return
    first = bisect.bisect_right(intervals, start, key=lambda piece: piece[1])  # first end > start
    last = bisect.bisect_left(intervals, end, key=lambda piece: piece[0])  # after the last start < end
    if first >= last:
        return
    kept = []
    if intervals[first][0] < start:
        kept.append([intervals[first][0], start])
    if intervals[last - 1][1] > end:
        kept.append([end, intervals[last - 1][1]])
    intervals[first:last] = kept
