"""The online calendar: one site's curtailment windows decided reading by reading, as a live
signal arrives.

:class:`OnlineCalendar` applies the calendar's rules (:mod:`curtail.planning.windows`:
threshold or percentile, hysteresis, poll, provisioning) to carbon-intensity readings
``(t_s, ci_g_per_kwh)`` one at a time, through the same :class:`~curtail.planning.windows.WindowWalk`
as the offline calendar, so the two agree exactly: fed a trace's samples in order, it yields
the offline calendar's windows (``windows(until_s=signal.end_s) == compute_windows(...)``).

Time is the readings' own time. ``now_s`` is how far the readings are known; queries after it
raise :class:`NotYetKnownError`, so a consumer never sees past the last reading.

Readings that do not arrive in order:

* **repeated** — the same instant and value again is ignored (:meth:`OnlineCalendar.add`
  returns False); the same instant with another value raises :class:`ConflictingReadingError`.
* **late** — with ``reorder_tolerance_s = 0`` (default) a reading older than the newest one
  raises :class:`LateReadingError`. With a tolerance, readings wait in a buffer and are applied,
  in time order, once a reading ``reorder_tolerance_s`` newer has arrived (a watermark): the
  calendar then knows only up to ``newest received - reorder_tolerance_s``, and a reading older
  than that is late. Decisions already visible are never rewritten.

Percentile thresholds use the readings applied so far: the percentile of the trailing
``percentile_window_s`` (the reading itself included), as the offline calendar computes it
(:func:`~curtail.planning.windows.curtailment_thresholds` is trailing, hence already causal),
so online and offline thresholds are equal on the same samples, bit for bit.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pandas as pd

from curtail.config import CurtailmentRules
from curtail.errors import CurtailError
from curtail.planning.signals import iso
from curtail.planning.windows import Window, WindowState, WindowWalk


class ReadingError(CurtailError):
    """A reading cannot be applied; the message names the reading and what to do."""


class LateReadingError(ReadingError):
    """A reading older than what the calendar already decided on."""


class ConflictingReadingError(ReadingError):
    """A second, different value for an instant that already has a reading."""


class NotYetKnownError(CurtailError):
    """A question about an instant after ``now_s`` (or before any reading was applied)."""


@dataclass(frozen=True)
class Reading:
    """One carbon-intensity reading: ``ci_g_per_kwh`` holding from ``t_s`` (UTC epoch seconds)."""

    t_s: float
    ci_g_per_kwh: float


class TrailingPercentile:
    """The ``percentile``-th percentile of the values in ``(t - window_s, t]``, one value at a time.

    Mirrors pandas' time-based rolling quantile (linear interpolation) on millisecond timestamps,
    which :func:`~curtail.planning.windows.curtailment_thresholds` uses, so the results are
    bit-identical.
    """

    def __init__(self, percentile: float, window_s: float):
        self.quantile = percentile / 100.0
        self.window_ns = pd.Timedelta(seconds=window_s).value
        self._times_ns: deque[int] = deque()
        self._values: deque[float] = deque()
        self._sorted: list[float] = []

    def add(self, t_s: float, value: float) -> float:
        """Add the value at ``t_s`` (after every earlier one) and return the percentile now."""
        t_ns = round(t_s * 1e3) * 1_000_000
        self._times_ns.append(t_ns)
        self._values.append(value)
        bisect.insort(self._sorted, value)
        while self._times_ns[0] <= t_ns - self.window_ns:
            self._times_ns.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, self._values.popleft())]
        position = self.quantile * (len(self._sorted) - 1)
        index = int(position)
        if index == position:
            return self._sorted[index]
        low, high = self._sorted[index], self._sorted[index + 1]
        return low + (high - low) * (position - index)  # pandas' formula, term for term


class OnlineCalendar:
    """One site's curtailment windows from readings as they arrive.

    >>> calendar = OnlineCalendar("caiso", CurtailmentRules())
    >>> calendar.add(t_s, 85.0)           # True: applied (False: a repeat)
    >>> calendar.state_at(calendar.now_s)  # WindowState.PROVISIONING
    >>> calendar.windows()                 # decided so far; an open window is cut at now_s
    """

    def __init__(self, site: str, rules: CurtailmentRules, *, reorder_tolerance_s: float = 0.0):
        if not reorder_tolerance_s >= 0 or math.isinf(reorder_tolerance_s):
            raise ValueError(f"reorder_tolerance_s must be a finite number of seconds >= 0, got {reorder_tolerance_s}")
        self.site = site
        self.rules = rules
        self.reorder_tolerance_s = reorder_tolerance_s
        self._percentile = (
            TrailingPercentile(rules.threshold_percentile, rules.percentile_window_s)
            if rules.threshold_kind == "percentile"
            else None
        )
        self._times_s: list[float] = []  # applied readings, in time order
        self._values: list[float] = []
        self._thresholds: list[float] = []
        self._buffer: dict[float, float] = {}  # received, not yet applied (newer than the watermark)
        self._newest_received_s = -math.inf
        self._decided_until_s = -math.inf  # the watermark: readings at or before it are final
        self._walk: WindowWalk | None = None  # every applied reading but the newest, stepped
        self._view: tuple[int, list[Window], list[float]] | None = None  # cache for state_at

    # ------------------------------------------------------------------------ readings

    def add(self, t_s: float, ci_g_per_kwh: float) -> bool:
        """Receive one reading; True if it is new, False if it repeats one already received.

        Raises :class:`LateReadingError`, :class:`ConflictingReadingError` or
        :class:`ReadingError` (a non-finite time, a negative or non-finite value).
        """
        if not math.isfinite(t_s):
            raise ReadingError(f"{self.site}: reading time {t_s} is not finite; give UTC epoch seconds")
        if not (math.isfinite(ci_g_per_kwh) and ci_g_per_kwh >= 0):
            raise ReadingError(
                f"{self.site}: reading at {iso(t_s)} has value {ci_g_per_kwh} gCO2/kWh; "
                "give a finite intensity >= 0 (drop readings the source marks invalid)"
            )
        known = self._received_value(t_s)
        if known is not None:
            if known == ci_g_per_kwh:
                return False
            raise ConflictingReadingError(
                f"{self.site}: reading at {iso(t_s)} is {ci_g_per_kwh} gCO2/kWh but {known} gCO2/kWh "
                "was received for that instant; a source must not revise a reading "
                "(drop the revision, or restart the calendar from a corrected record)"
            )
        watermark_s = self._watermark_s()
        if t_s <= watermark_s:
            raise LateReadingError(
                f"{self.site}: reading at {iso(t_s)} arrived after the calendar decided up to "
                f"{iso(watermark_s)} (newest reading {iso(self._newest_received_s)}, "
                f"reorder_tolerance_s = {self.reorder_tolerance_s:g}); drop it, or raise "
                "reorder_tolerance_s to buffer readings that much out of order"
            )
        self._buffer[t_s] = ci_g_per_kwh
        self._newest_received_s = max(self._newest_received_s, t_s)
        self._decided_until_s = max(self._decided_until_s, self._newest_received_s - self.reorder_tolerance_s)
        self._apply_up_to(self._decided_until_s)
        return True

    def flush(self) -> None:
        """Apply every buffered reading now (the stream ended, or stragglers are given up on).

        Afterwards ``now_s`` is the newest reading's instant, and anything older is late.
        """
        self._decided_until_s = self._newest_received_s
        self._apply_up_to(self._decided_until_s)

    def advance(self, t_s: float) -> None:
        """Nothing newer than the readings already received holds at or before ``t_s``: the
        newest reading is known to hold until ``t_s``, so ``now_s`` becomes ``t_s`` (a live
        signal's clock passing without a new reading). A later reading at or before ``t_s`` is
        late. Never moves ``now_s`` back; does nothing before the first reading."""
        if not math.isfinite(t_s):
            raise ValueError(f"{self.site}: advance to {t_s}: give UTC epoch seconds")
        if self._times_s and t_s > self._decided_until_s:
            self._decided_until_s = t_s
            self._apply_up_to(t_s)

    @property
    def now_s(self) -> float | None:
        """How far the readings are known (UTC epoch seconds); None before the first is applied.

        The newest applied reading holds at least until ``now_s``: no later reading may arrive
        for an instant at or before it.
        """
        return self._watermark_s() if self._times_s else None

    @property
    def readings(self) -> tuple[Reading, ...]:
        """The applied readings, in time order (buffered ones not included)."""
        return tuple(Reading(t, v) for t, v in zip(self._times_s, self._values))

    def samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The applied readings as arrays: times (s), values and thresholds (gCO2/kWh)."""
        return np.array(self._times_s), np.array(self._values), np.array(self._thresholds)

    # ------------------------------------------------------------------------ queries

    def windows(self, until_s: float | None = None) -> list[Window]:
        """The windows decided so far; one still open is cut at ``until_s`` (default ``now_s``).

        Equals the offline calendar's windows of the applied readings as a trace ending at
        ``until_s``. ``until_s`` after ``now_s`` assumes the newest reading holds until then
        (what the offline calendar assumes of a trace's last sample; pass a trace's ``end_s``
        to compare). A window opening exactly at ``now_s`` is listed once ``until_s`` passes it;
        :meth:`state_at` reports it already.
        """
        now_s = self._require_now()
        until_s = now_s if until_s is None else until_s
        if until_s < now_s:
            raise ValueError(f"until_s ({iso(until_s)}) is before now_s ({iso(now_s)}); give until_s >= now_s")
        return self._walk_through(until_s)

    def windows_opened(self) -> list[Window]:
        """The windows opened by ``now_s``, as the readings so far decide them: one still open has
        ``close_s = inf``; one closing (hysteresis running) its decided close."""
        now_s = self._require_now()
        windows, opens = self._state_view()
        return windows[: bisect.bisect_right(opens, now_s)]

    def state_at(self, t_s: float) -> WindowState:
        """The site's state at ``t_s`` (at most ``now_s``), exactly as the offline calendar's."""
        window = self.window_at(t_s)
        return WindowState.OFF if window is None else window.state_at(t_s)

    def window_at(self, t_s: float) -> Window | None:
        """The window the site is in at ``t_s`` (at most ``now_s``), or None. A window still open
        has ``close_s = inf`` (its close is not decided yet)."""
        self._require_known(t_s)
        windows, opens = self._state_view()
        index = bisect.bisect_right(opens, t_s) - 1
        if index >= 0 and t_s < windows[index].close_s:
            return windows[index]
        return None

    def changes_after(self, t_s: float) -> list[float]:
        """The instants after ``t_s`` at which the site's state changes if no new reading arrives
        (a window's ready time, a hysteresis close, draining edges), in time order."""
        windows, _ = self._state_view()
        changes = set()
        for window in windows:
            changes.update((window.open_s, window.ready_s, window.close_s))
            for a, b in window.draining_s:
                changes.update((a, b))
        return sorted(c for c in changes if t_s < c < math.inf)

    def in_window_at(self, t_s: float) -> bool:
        """Whether the site is in a curtailment window at ``t_s`` (provisioning, ready or draining)."""
        return self.state_at(t_s) is not WindowState.OFF

    def value_at(self, t_s: float) -> float:
        """The reading in force at ``t_s`` (gCO2/kWh; at most ``now_s``)."""
        self._require_known(t_s)
        return self._values[max(bisect.bisect_right(self._times_s, t_s) - 1, 0)]

    def threshold_at(self, t_s: float) -> float:
        """The curtailment threshold (gCO2/kWh) in force at ``t_s`` (at most ``now_s``)."""
        self._require_known(t_s)
        index = max(bisect.bisect_right(self._times_s, t_s) - 1, 0)
        return self._thresholds[index]

    # ------------------------------------------------------------------------ internals

    def _watermark_s(self) -> float:
        return self._decided_until_s

    def _received_value(self, t_s: float) -> float | None:
        if t_s in self._buffer:
            return self._buffer[t_s]
        index = bisect.bisect_left(self._times_s, t_s)
        if index < len(self._times_s) and self._times_s[index] == t_s:
            return self._values[index]
        return None

    def _apply_up_to(self, watermark_s: float) -> None:
        for t_s in sorted(t for t in self._buffer if t <= watermark_s):
            self._apply(t_s, self._buffer.pop(t_s))

    def _apply(self, t_s: float, value: float) -> None:
        if self._percentile is not None:
            threshold = self._percentile.add(t_s, value)
        else:
            threshold = float(self.rules.threshold_g_per_kwh)
        if self._walk is None:
            self._walk = WindowWalk(self.site, self.rules, origin_s=t_s)
        else:  # the previous newest reading now has its end: step it
            self._walk.step(self._times_s[-1], self._values[-1], self._thresholds[-1], next_s=t_s)
        self._times_s.append(t_s)
        self._values.append(value)
        self._thresholds.append(threshold)

    def _walk_through(self, until_s: float) -> list[Window]:
        """The committed walk, plus the newest reading held until ``until_s``, cut there."""
        assert self._walk is not None
        walk = self._walk.copy()
        walk.step(self._times_s[-1], self._values[-1], self._thresholds[-1], next_s=until_s)
        return walk.finish(until_s)

    def _state_view(self) -> tuple[list[Window], list[float]]:
        """The windows (and their openings) with the newest reading held without end.

        They decide every instant up to ``now_s`` as any later reading would: a decision at a
        poll uses only the readings up to that poll.
        """
        if self._view is None or self._view[0] != len(self._times_s):
            windows = self._walk_through(math.inf)
            self._view = (len(self._times_s), windows, [w.open_s for w in windows])
        return self._view[1], self._view[2]

    def _require_now(self) -> float:
        now_s = self.now_s
        if now_s is None:
            raise NotYetKnownError(
                f"{self.site}: no reading applied yet; add readings first"
                + (f" ({len(self._buffer)} buffered until reorder_tolerance_s passes)" if self._buffer else "")
            )
        return now_s

    def _require_known(self, t_s: float) -> None:
        now_s = self._require_now()
        if t_s > now_s:
            raise NotYetKnownError(
                f"{self.site}: asked about {iso(t_s)}, after now_s ({iso(now_s)}, the readings' horizon); "
                "ask about instants up to now_s, or add newer readings first"
            )
