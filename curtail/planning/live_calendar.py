"""The live calendar: every site's curtailment windows as a live signal arrives, on the run's clock.

A live run cannot compute its calendar in advance. :class:`LiveCalendar` answers the questions a
policy asks of the offline :class:`~curtail.planning.windows.CurtailmentCalendar`
(``window_at``, ``state_at``, ``next_change_after``, ``threshold_at``) from readings pulled from
a :class:`SignalFeed` up to the instant asked about, through one
:class:`~curtail.planning.online_calendar.OnlineCalendar` per site. It never looks past the
instant asked about: the feed hands over only readings whose own time has come.

**When a reading takes effect.** A reading applies from its own time when the run learns of it
in time to act on it, i.e. at or before the first poll that would see it; a reading learnt later
(published late, or fetched after a source outage) applies from the first poll at which the run
has it. ``applied`` lists every reading with both instants, so the offline calendar of the
readings at their effective instants (:meth:`recorded_signals`) decides exactly what the live
calendar decided: a live run replays exactly in the simulator.

**When to ask again.** ``next_change_after(t)`` is the earliest of: a change the readings so far
already decide (a window's ready time, a hysteresis close), and the poll at which each site's
next reading is due (the newest reading's time plus the signal's step; ``recheck_s`` after that
while it is overdue). A policy that returns it as its next decision time (the threshold policy
does) is asked at every instant its intents could change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from curtail.config import CurtailmentRules
from curtail.errors import CurtailError
from curtail.planning.online_calendar import NotYetKnownError, OnlineCalendar
from curtail.planning.signals import Signal, iso
from curtail.planning.windows import Window, WindowState, poll_at_or_after

ReadingOrigin = Literal["source", "fallback", "lost"]
"""Where a reading came from: the live source, the configured fallback source, or the value a
run assumes while its signal is lost (:class:`~curtail.config.LiveConfig` ``lost_ci_g_per_kwh``)."""


@dataclass(frozen=True)
class FedReading:
    """A reading as a feed hands it over: ``ci_g_per_kwh`` from ``sample_t_s`` (UTC epoch s)."""

    site: str
    sample_t_s: float
    ci_g_per_kwh: float
    origin: ReadingOrigin = "source"


@dataclass(frozen=True)
class AppliedReading:
    """A reading as the run used it: from ``effective_t_s``; learnt at run time ``received_t_s``."""

    site: str
    sample_t_s: float
    effective_t_s: float
    received_t_s: float
    ci_g_per_kwh: float
    origin: ReadingOrigin

    @property
    def late(self) -> bool:
        return self.effective_t_s != self.sample_t_s

    def to_json(self) -> dict[str, float | str]:
        return {
            "site": self.site, "sample_t_s": self.sample_t_s, "effective_t_s": self.effective_t_s,
            "received_t_s": self.received_t_s, "ci_g_per_kwh": self.ci_g_per_kwh, "origin": self.origin,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> AppliedReading:
        return cls(
            str(data["site"]), float(data["sample_t_s"]), float(data["effective_t_s"]),  # type: ignore[arg-type]
            float(data["received_t_s"]), float(data["ci_g_per_kwh"]), data["origin"],  # type: ignore[arg-type]
        )


class SignalFeed(Protocol):
    """Where a live calendar's readings come from (a live source, a recording, a trace)."""

    def readings_until(self, t_s: float) -> Sequence[FedReading]:
        """Readings not handed over before, each with ``sample_t_s <= t_s``; called with
        non-decreasing ``t_s`` (the run's clock)."""
        ...


class LiveSignalError(CurtailError):
    """The live signal cannot start a run (no reading for a site)."""


class LiveCalendar:
    """Every site's windows from a live feed (see the module doc).

    >>> calendar = LiveCalendar(["caiso", "texas"], rules, feed)
    >>> start_s = calendar.start(now_s)     # the first readings; the run starts here
    >>> calendar.window_at("caiso", t_s), calendar.next_change_after(t_s)
    """

    def __init__(
        self,
        sites: Sequence[str],
        rules: CurtailmentRules,
        feed: SignalFeed,
        *,
        step_s: float = 300.0,
        recheck_s: float = 60.0,
        on_reading: Callable[[AppliedReading], None] | None = None,
    ):
        if not step_s > 0 or not recheck_s > 0:
            raise ValueError(f"step_s ({step_s}) and recheck_s ({recheck_s}) must be > 0 seconds")
        self.rules = rules
        self.feed = feed
        self.default_step_s = step_s
        self.recheck_s = recheck_s
        self.on_reading = on_reading
        self._calendars = {site: OnlineCalendar(site, rules) for site in sites}
        self._samples: dict[str, list[float]] = {site: [] for site in sites}  # sample times received
        self._origins: dict[str, float] = {}  # each site's poll grid starts at its first reading
        self._known_s = -math.inf  # readings pulled up to here
        self.applied: list[AppliedReading] = []

    @property
    def sites(self) -> list[str]:
        return list(self._calendars)

    # ------------------------------------------------------------------------ the clock

    def start(self, now_s: float) -> float:
        """Pull the first readings; the run's start: ``now_s``, or the newest site's first
        reading if later. Raises :class:`LiveSignalError` naming sites the feed has nothing for."""
        self._pull(now_s)
        missing = [site for site, calendar in self._calendars.items() if calendar.now_s is None]
        if missing:
            raise LiveSignalError(
                f"the live signal has no reading at or before {iso(now_s)} for sites {missing}; "
                "check the source's region names and credentials (events above say what failed)"
            )
        start_s = max([now_s, *self._origins.values()])
        self.catch_up(start_s)
        return start_s

    def restore(self, applied: Sequence[AppliedReading]) -> None:
        """Take back the readings a run had used before it went down (its record), each from
        its recorded effective instant; the next :meth:`catch_up` goes on from the newest."""
        for reading in applied:
            calendar = self._calendars[reading.site]
            if calendar.now_s is None:
                self._origins[reading.site] = reading.effective_t_s
            calendar.add(reading.effective_t_s, reading.ci_g_per_kwh)
            self._samples[reading.site].append(reading.sample_t_s)
            self.applied.append(reading)
        self._known_s = max([self._known_s, *(r.effective_t_s for r in applied)])

    def catch_up(self, t_s: float) -> None:
        """Pull every reading due by ``t_s`` and let the calendars know ``t_s`` has come."""
        if t_s <= self._known_s:
            return
        self._pull(t_s)
        for calendar in self._calendars.values():
            calendar.advance(t_s)
        self._known_s = t_s

    def _pull(self, t_s: float) -> None:
        for reading in self.feed.readings_until(t_s):
            if reading.site not in self._calendars:
                raise LiveSignalError(f"the feed handed over a reading for unknown site {reading.site!r}")
            if reading.sample_t_s > t_s:
                raise LiveSignalError(
                    f"the feed handed over {reading.site}'s reading at {iso(reading.sample_t_s)} when asked "
                    f"up to {iso(t_s)}: a feed must not pass the run's clock"
                )
            self._apply(reading, t_s)

    def _apply(self, reading: FedReading, t_s: float) -> None:
        calendar = self._calendars[reading.site]
        if calendar.now_s is None:
            effective_s = reading.sample_t_s
            self._origins[reading.site] = effective_s
        else:
            origin_s = self._origins[reading.site]
            first_poll_s = poll_at_or_after(reading.sample_t_s, origin_s, self.rules.poll_s)
            if reading.sample_t_s > calendar.now_s and first_poll_s >= t_s:
                effective_s = reading.sample_t_s  # learnt in time: as the offline calendar
            else:  # learnt late: from the first poll the run has it, after what is decided
                effective_s = poll_at_or_after(t_s, origin_s, self.rules.poll_s)
                if effective_s <= calendar.now_s:  # the first poll after what is decided
                    polls = math.floor((calendar.now_s - origin_s) / self.rules.poll_s + 1e-9) + 1
                    effective_s = origin_s + polls * self.rules.poll_s
        calendar.add(effective_s, reading.ci_g_per_kwh)
        self._samples[reading.site].append(reading.sample_t_s)
        applied = AppliedReading(
            reading.site, reading.sample_t_s, effective_s, t_s, reading.ci_g_per_kwh, reading.origin
        )
        self.applied.append(applied)
        if self.on_reading is not None:
            self.on_reading(applied)

    # ------------------------------------------------------------------------ queries

    def window_at(self, site: str, t_s: float) -> Window | None:
        """The window ``site`` is in at ``t_s`` (an open one has ``close_s = inf``), or None."""
        self.catch_up(t_s)
        return self._calendar(site).window_at(t_s)

    def state_at(self, site: str, t_s: float) -> WindowState:
        self.catch_up(t_s)
        return self._calendar(site).state_at(t_s)

    def states_at(self, t_s: float) -> dict[str, WindowState]:
        return {site: self.state_at(site, t_s) for site in self._calendars}

    def value_at(self, site: str, t_s: float) -> float:
        """The reading in force for ``site`` at ``t_s`` (gCO2/kWh)."""
        self.catch_up(t_s)
        return self._calendar(site).value_at(t_s)

    def threshold_at(self, site: str, t_s: float) -> float:
        self.catch_up(t_s)
        return self._calendar(site).threshold_at(t_s)

    def next_change_after(self, t_s: float) -> float:
        """When the calendar may change next (see the module doc); always a finite instant."""
        self.catch_up(t_s)
        candidates = []
        for site, calendar in self._calendars.items():
            candidates += calendar.changes_after(t_s)[:1]
            candidates.append(self._next_reading_due(site, t_s))
        return min(candidates)

    def received(self, site: str) -> int:
        """How many readings ``site`` has received."""
        return len(self._samples[site])

    def windows(self, site: str) -> list[Window]:
        """``site``'s windows opened so far; one still open has ``close_s = inf``."""
        return self._calendar(site).windows_opened()

    def thresholds(self, site: str) -> np.ndarray:
        """The threshold (gCO2/kWh) in force from each reading of :meth:`known_signal` on."""
        return self._calendar(site).samples()[2]

    def known_signal(self, site: str, region: str) -> Signal:
        """``site``'s readings so far at their effective instants, the newest holding one step:
        the past a policy may read (the replay's signal has the same samples up to now)."""
        times, values, _ = self._calendar(site).samples()
        return Signal(region, times, values, self.step_s(site), source="live")

    def step_s(self, site: str) -> float:
        """The site's signal step: the median spacing of its readings (``step_s`` before two)."""
        samples = self._samples[site]
        if len(samples) < 2:
            return self.default_step_s
        return max(float(np.median(np.diff(samples[-50:]))), self.rules.poll_s)

    def _next_reading_due(self, site: str, t_s: float) -> float:
        origin_s = self._origins[site]
        due_s = poll_at_or_after(self._samples[site][-1] + self.step_s(site), origin_s, self.rules.poll_s)
        if due_s <= t_s:  # overdue: look again every recheck_s
            due_s = poll_at_or_after(t_s + self.recheck_s, origin_s, self.rules.poll_s)
        return due_s

    def _calendar(self, site: str) -> OnlineCalendar:
        if site not in self._calendars:
            raise KeyError(f"no site {site!r} in the live calendar; sites: {self.sites}")
        calendar = self._calendars[site]
        if calendar.now_s is None:
            raise NotYetKnownError(f"{site}: no reading yet; call start() first")
        return calendar

    # ------------------------------------------------------------------------ the record

    def recorded_signals(
        self, end_s: float, regions: Mapping[str, str], *, kind: str = "marginal", source: str = "live"
    ) -> dict[str, Signal]:
        """Each site's readings at their effective instants, holding until ``end_s``: the signal
        the run followed (the simulator replays the run's decisions from it exactly)."""
        return signals_from_readings(self.applied, end_s, regions, kind=kind, source=source)


class KnownSignals(Mapping[str, Signal]):
    """The live run's ``PolicyContext.signals``: each site's :meth:`LiveCalendar.known_signal`,
    built when asked (a policy reads the past and the present through it, never the future)."""

    def __init__(self, calendar: LiveCalendar, regions: Mapping[str, str]):
        self.calendar, self.regions = calendar, dict(regions)
        self._cache: dict[str, tuple[int, Signal]] = {}

    def __getitem__(self, site: str) -> Signal:
        count = self.calendar.received(site)
        cached = self._cache.get(site)
        if cached is None or cached[0] != count:
            cached = (count, self.calendar.known_signal(site, self.regions[site]))
            self._cache[site] = cached
        return cached[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)


class TraceFeed:
    """A :class:`SignalFeed` handing over recorded signals' samples as the clock reaches them
    (tests, and live runs against a trace on the virtual clock)."""

    def __init__(self, signals: Mapping[str, Signal]):
        self._signals = dict(signals)
        self._next = dict.fromkeys(self._signals, 0)

    def readings_until(self, t_s: float) -> list[FedReading]:
        readings = []
        for site, signal in self._signals.items():
            first = self._next[site]
            last = int(np.searchsorted(signal.times_s, t_s, side="right"))
            readings += [
                FedReading(site, float(signal.times_s[i]), float(signal.ci_g_per_kwh[i])) for i in range(first, last)
            ]
            self._next[site] = max(first, last)
        return readings


def signals_from_readings(
    readings: Sequence[AppliedReading],
    end_s: float,
    regions: Mapping[str, str],
    *,
    kind: str = "marginal",
    source: str = "live",
) -> dict[str, Signal]:
    """Per site, the :class:`Signal` (of the site's region) of ``readings`` at their effective
    instants, the last one holding until ``end_s`` (its resolution is stretched to reach it)."""
    by_site: dict[str, list[AppliedReading]] = {}
    for reading in readings:
        by_site.setdefault(reading.site, []).append(reading)
    signals = {}
    for site, site_readings in by_site.items():
        times = np.array([r.effective_t_s for r in site_readings])
        values = np.array([r.ci_g_per_kwh for r in site_readings])
        if not np.all(np.diff(times) > 0):
            raise ValueError(f"{site}: recorded readings are not in strictly increasing effective time")
        resolution_s = max(float(end_s - times[-1]), 1e-9)
        signals[site] = Signal(regions[site], times, values, resolution_s, kind, source)
    return signals


__all__ = [
    "AppliedReading", "FedReading", "KnownSignals", "LiveCalendar", "LiveSignalError", "ReadingOrigin", "SignalFeed",
    "TraceFeed", "signals_from_readings",
]
