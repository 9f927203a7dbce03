"""Real-time polling of a carbon source: a cache, typed failure events, a configured fallback.

The calendar reads the signal often (the prior system every 10 s) but the grid publishes new
values every 5 minutes, and APIs fail. :class:`RealtimePoller` sits between them:

- ``read(region)`` answers from the cache while the cached value is younger than
  ``refresh_s``; otherwise it asks the source (at most once per ``refresh_s`` per region).
- When the source fails or times out it never raises the raw error. It records a
  :class:`SourceEvent` (``failed``), then degrades in a fixed order: the last good value while
  it is younger than ``max_stale_s`` (``stale``); else the ``fallback`` source — typically a
  :class:`~curtail.sources.base.TraceFileSource` or another API (``fallback``); else it raises
  :class:`SignalLost`, a :class:`~curtail.sources.base.SourceUnavailable` that names the region,
  the failure and how long the signal has been gone. A failed source is retried after
  ``retry_s``, not on every read. The first good answer after a failure is a ``recovered`` event.
- Every value served is kept, so :meth:`recorded_signal` hands back what the run actually saw
  as a :class:`~curtail.planning.signals.Signal` (and ``write_trace_csv`` turns it into a trace
  that replays the run).

``start()`` polls every region in a daemon thread (errors become events, the thread never
dies); ``stop()`` ends it. The clock is injectable so tests and virtual-clock runs control it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from curtail.planning.signals import Signal, iso
from curtail.sources.base import CarbonSource, Reading, SourceError, SourceUnavailable, make_signal

log = logging.getLogger("curtail.sources")

EventKind = Literal["failed", "stale", "fallback", "recovered", "lost"]


@dataclass(frozen=True)
class SourceEvent:
    """Something a run should know about its signal: ``kind`` at ``t_s`` for ``region``."""

    t_s: float
    region: str
    source: str
    kind: EventKind
    detail: str = ""

    def __str__(self) -> str:
        return f"{iso(self.t_s)} {self.region} {self.source}: {self.kind}" + (
            f" ({self.detail})" if self.detail else ""
        )


class SignalLost(SourceUnavailable):
    """No live value, no fresh cached one and no working fallback for a region."""

    def __init__(self, source: str, region: str, problem: str):
        self.region = region
        super().__init__(source, problem)


@dataclass
class _RegionState:
    good: Reading | None = None  # the last value the source itself gave
    asked_s: float = -math.inf  # when the source was last asked
    failing: bool = False
    failed_since_s: float = math.nan
    served: list[Reading] = field(default_factory=list)


class RealtimePoller:
    """Cache and degrade in front of a :class:`CarbonSource` (see the module doc).

    Args:
        source: the live source.
        regions: regions :meth:`poll_all` and the background thread keep fresh.
        refresh_s: ask the source at most this often per region (default 300 s, the grids' step).
        max_stale_s: serve the last good value for this long after it was fetched (default 900 s).
        retry_s: after a failure, wait this long before asking the source again (default 60 s).
        fallback: asked when the source fails and the cache is too old (e.g. a trace file).
        on_event: called with every :class:`SourceEvent` (the events are also in ``events``).
        clock: wall clock in UTC epoch seconds (injectable).
    """

    def __init__(
        self,
        source: CarbonSource,
        regions: Iterable[str] = (),
        *,
        refresh_s: float = 300.0,
        max_stale_s: float = 900.0,
        retry_s: float = 60.0,
        fallback: CarbonSource | None = None,
        on_event: Callable[[SourceEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.source = source
        self.regions = list(regions)
        self.refresh_s, self.max_stale_s, self.retry_s = refresh_s, max_stale_s, retry_s
        self.fallback = fallback
        self.on_event = on_event
        self.clock = clock
        self.events: list[SourceEvent] = []
        self._state: dict[str, _RegionState] = {}
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -------------------------------------------------------------- events

    def _event(self, now_s: float, region: str, kind: EventKind, detail: str = "") -> None:
        event = SourceEvent(now_s, region, self.source.name, kind, detail)
        self.events.append(event)
        (log.info if kind == "recovered" else log.warning)("%s", event)
        if self.on_event is not None:
            self.on_event(event)

    # -------------------------------------------------------------- reading

    def read(self, region: str, now_s: float | None = None) -> Reading:
        """The value to use now for ``region`` (fresh, cached, stale or fallback); see the module doc."""
        now = self.clock() if now_s is None else now_s
        with self._lock:
            state = self._state.setdefault(region, _RegionState())
            fresh = (
                state.good is not None
                and not state.failing
                and now - state.asked_s < self.refresh_s
            )
            due = now - state.asked_s >= (self.retry_s if state.failing else self.refresh_s)
            if fresh or not due:
                if state.good is not None and not state.failing:
                    return self._serve(state, state.good)
                if not due and state.failing:
                    return self._degraded(state, region, now, None)
            state.asked_s = now
            try:
                reading = self.source.latest(region, now)
            except SourceError as error:
                if not state.failing:
                    state.failing, state.failed_since_s = True, now
                self._event(now, region, "failed", str(error))
                return self._degraded(state, region, now, error)
            if state.failing:
                self._event(now, region, "recovered", f"after {now - state.failed_since_s:.0f} s")
            state.failing = False
            state.good = replace(reading, fetched_s=now)
            return self._serve(state, state.good)

    def _degraded(
        self, state: _RegionState, region: str, now: float, error: SourceError | None
    ) -> Reading:
        if state.good is not None and now - state.good.fetched_s <= self.max_stale_s:
            if error is not None:
                self._event(
                    now,
                    region,
                    "stale",
                    f"serving the value fetched {now - state.good.fetched_s:.0f} s ago",
                )
            return self._serve(state, replace(state.good, stale=True))
        if self.fallback is not None:
            try:
                reading = self.fallback.latest(region, now)
            except SourceError as fallback_error:
                cause = f"fallback {self.fallback.name} failed too: {fallback_error}"
            else:
                if error is not None:
                    self._event(now, region, "fallback", f"using {self.fallback.name}")
                return self._serve(state, replace(reading, fallback=True, fetched_s=now))
        else:
            cause = "no fallback configured"
        gone = now - state.failed_since_s if not math.isnan(state.failed_since_s) else 0.0
        last = (
            f"; last good value {now - state.good.fetched_s:.0f} s old"
            if state.good is not None
            else ""
        )
        if error is not None:  # once per failed ask, not on every read in between
            self._event(now, region, "lost", cause)
        raise SignalLost(
            self.source.name,
            region,
            f"no signal for region {region!r} for {gone:.0f} s ({cause}{last}); "
            "configure a fallback (e.g. a trace file) or raise max_stale_s",
        )

    def _serve(self, state: _RegionState, reading: Reading) -> Reading:
        if (
            not state.served
            or state.served[-1].t_s != reading.t_s
            or state.served[-1].ci_g_per_kwh != reading.ci_g_per_kwh
        ):
            state.served.append(reading)
        return reading

    def poll_all(self, now_s: float | None = None) -> dict[str, Reading | SignalLost]:
        """Read every configured region once; a lost signal is returned, not raised."""
        results: dict[str, Reading | SignalLost] = {}
        for region in self.regions:
            try:
                results[region] = self.read(region, now_s)
            except SignalLost as lost:
                results[region] = lost
        return results

    def recorded_signal(self, region: str, *, resolution_s: float | None = None) -> Signal:
        """The values served for ``region`` so far, as a Signal (stale repeats collapse)."""
        with self._lock:
            served = list(self._state.get(region, _RegionState()).served)
        if not served:
            raise SignalLost(
                self.source.name, region, f"nothing was served for region {region!r} yet"
            )
        return make_signal(
            self.source.name,
            region,
            [r.t_s for r in served],
            [r.ci_g_per_kwh for r in served],
            kind=served[-1].kind,
            resolution_s=resolution_s,
        )

    # -------------------------------------------------------------- background polling

    def start(self, interval_s: float = 10.0) -> RealtimePoller:
        """Poll every region every ``interval_s`` in a daemon thread (reads hit the cache)."""
        if self._thread is not None:
            return self
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.poll_all()
                except Exception:
                    log.exception("carbon poller: unexpected error")
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, name="curtail-carbon-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
