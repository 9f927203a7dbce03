"""A live run's forecasts: the source's newest forecast fetched on the run's clock, recorded as received.

Forecast-reading policies (``forecast``, ``budget``) read, at each decision, the newest forecast
a site's source published. :class:`LiveForecasts` asks the source for every site's region every
``forecast_refresh_s`` of the run's clock (WattTime publishes every 5 min) and hands each site's
policy a :class:`LiveForecast` (the ``latest(now_s)`` a recorded
:class:`~curtail.planning.traces.Forecast` has, plus ``next_due_s`` so the policy is asked when a
new one arrives). A forecast takes effect at the instant it was fetched (``effective_t_s``), never
before, whatever the source says it was issued at.

A failing forecast request is an event (``signal_forecast_failed`` once per outage,
``signal_forecast_recovered``), never a crash: the policy keeps the last forecast, whose reach
shrinks as the clock passes its targets, and runs its no-forecast fallback once it has nothing
ahead. Every forecast is recorded in ``live_forecasts.jsonl`` (:class:`ReceivedForecast`, one
JSON line each, flushed as it arrives); :func:`forecasts_from_records` rebuilds the forecasts the
run read for ``curtail replay``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from curtail.planning.traces import Forecast
from curtail.sources.base import CarbonSource, SourceError

FORECASTS_FILE = "live_forecasts.jsonl"
"""A live run's forecasts as it read them, one JSON object per line (:class:`ReceivedForecast`)."""

ForecastEventSink = Callable[[float, str, str, dict[str, Any]], None]
"""Called with ``(t_s, site, event, details)`` for ``signal_forecast_failed`` / ``_recovered``."""


@dataclass(frozen=True)
class ReceivedForecast:
    """One forecast as the run read it: from run time ``effective_t_s`` (when it was fetched);
    ``issued_t_s`` is the source's own issue time."""

    site: str
    issued_t_s: float
    effective_t_s: float
    targets_s: tuple[float, ...]
    ci_g_per_kwh: tuple[float, ...]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site, "issued_t_s": self.issued_t_s, "effective_t_s": self.effective_t_s,
            "targets_s": list(self.targets_s), "ci_g_per_kwh": list(self.ci_g_per_kwh), "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReceivedForecast:
        return cls(
            str(data["site"]), float(data["issued_t_s"]), float(data["effective_t_s"]),
            tuple(float(t) for t in data["targets_s"]), tuple(float(v) for v in data["ci_g_per_kwh"]),
            str(data["source"]),
        )


class LiveForecast:
    """One site's forecasts so far, read like a recorded :class:`Forecast` (``latest``)."""

    def __init__(self, store: LiveForecasts, site: str):
        self.store, self.site = store, site

    def latest(self, now_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """The newest forecast the run had fetched by ``now_s`` (fetching one if due), or None."""
        self.store.refresh(now_s)
        return self.store.latest(self.site, now_s)

    def next_due_s(self, now_s: float) -> float:
        """When the next forecast is fetched (after ``now_s``)."""
        return self.store.next_due_s(now_s)


class LiveForecasts:
    """Every site's forecasts from ``source`` on the run's clock (see the module doc).

    >>> forecasts = LiveForecasts({"caiso": "CAISO_NORTH"}, source, refresh_s=300.0)
    >>> forecasts.begin(start_s)                 # the first fetch; the refresh grid starts here
    >>> forecasts.for_site("caiso").latest(t_s)  # what the policy reads
    """

    def __init__(
        self,
        regions: Mapping[str, str],
        source: CarbonSource,
        *,
        refresh_s: float = 300.0,
        horizon_s: float = 24 * 3600.0,
        on_forecast: Callable[[ReceivedForecast], None] | None = None,
        on_event: ForecastEventSink | None = None,
    ):
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be > 0 seconds, got {refresh_s}")
        self.regions = dict(regions)  # site -> the source's region name
        self.source = source
        self.refresh_s = refresh_s
        self.horizon_s = horizon_s
        self.on_forecast = on_forecast
        self.on_event = on_event
        self.received: list[ReceivedForecast] = []
        self._by_site: dict[str, list[ReceivedForecast]] = {site: [] for site in self.regions}
        self._origin_s: float | None = None
        self._fetched_s = -math.inf  # the newest instant a fetch was made at
        self._failing: set[str] = set()

    def for_site(self, site: str) -> LiveForecast:
        if site not in self.regions:
            raise KeyError(f"no site {site!r} in the live forecasts; sites: {sorted(self.regions)}")
        return LiveForecast(self, site)

    def begin(self, start_s: float) -> None:
        """Fetch the first forecasts at ``start_s``; later ones every ``refresh_s`` from it."""
        self._origin_s = start_s
        self.refresh(start_s)

    def restore(self, received: Sequence[ReceivedForecast], start_s: float) -> None:
        """Take back what a run had received before it went down; the refresh grid stays the
        run's (from ``start_s``)."""
        self._origin_s = start_s
        for forecast in received:
            self.received.append(forecast)
            self._by_site[forecast.site].append(forecast)
            self._fetched_s = max(self._fetched_s, forecast.effective_t_s)

    def next_due_s(self, now_s: float) -> float:
        if self._origin_s is None:
            return math.inf
        periods = math.floor((now_s - self._origin_s) / self.refresh_s + 1e-9) + 1
        return self._origin_s + max(periods, 0) * self.refresh_s

    def refresh(self, now_s: float) -> None:
        """Fetch every site's forecast if one is due by ``now_s`` (at most once per instant)."""
        if self._origin_s is None or now_s < self._origin_s:
            return
        due_s = self.next_due_s(self._fetched_s) if self._fetched_s > -math.inf else self._origin_s
        if now_s < due_s:
            return
        self._fetched_s = now_s
        asked: dict[str, Forecast | SourceError] = {}
        for site, region in self.regions.items():
            if region not in asked:
                try:
                    asked[region] = self._issued_by(region, now_s)
                except SourceError as error:
                    asked[region] = error
            self._take(site, asked[region], now_s)

    def _issued_by(self, region: str, now_s: float) -> Forecast:
        """The source's newest forecast issued at or before ``now_s``. A source ahead of the run
        (a lagged run, a served trace's clock) is asked for its history of forecasts; one without
        history gives nothing new (the policy keeps the last): a forecast issued after now would
        tell the run its own future."""
        answer = self.source.forecast(region, now_s, horizon_s=self.horizon_s)
        if not len(answer.request_s) or answer.request_s[-1] <= now_s:
            return answer
        history = getattr(self.source, "forecast_history", None)
        if history is None:
            return Forecast(region, np.array([]), np.array([0]), np.array([]), np.array([]), answer.source)
        issued = history(region, now_s - 2 * self.refresh_s, now_s, horizon_s=self.horizon_s)
        keep = int(np.searchsorted(issued.request_s, now_s, side="right"))
        return Forecast(region, issued.request_s[:keep], issued.offsets[: keep + 1], issued.target_s,
                        issued.ci_g_per_kwh, issued.source)

    def _take(self, site: str, answer: Forecast | SourceError, now_s: float) -> None:
        if isinstance(answer, SourceError):
            if site not in self._failing:
                self._failing.add(site)
                self._emit(now_s, site, "signal_forecast_failed", {"detail": str(answer)[-300:]})
            return
        if site in self._failing:
            self._failing.discard(site)
            self._emit(now_s, site, "signal_forecast_recovered", {"source": answer.source})
        if not len(answer.request_s):
            return
        issued_s = float(answer.request_s[-1])  # a live source answers with its newest issue
        targets, values = answer.latest(issued_s)  # type: ignore[misc]
        forecast = ReceivedForecast(
            site, issued_s, now_s, tuple(float(t) for t in targets), tuple(float(v) for v in values),
            answer.source or self.source.name,
        )
        self.received.append(forecast)
        self._by_site[site].append(forecast)
        if self.on_forecast is not None:
            self.on_forecast(forecast)

    def latest(self, site: str, now_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """The newest forecast for ``site`` effective at or before ``now_s``, or None."""
        for forecast in reversed(self._by_site[site]):
            if forecast.effective_t_s <= now_s:
                return np.array(forecast.targets_s), np.array(forecast.ci_g_per_kwh)
        return None

    def _emit(self, t_s: float, site: str, event: str, details: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(t_s, site, event, details)


class JsonLinesRecord:
    """Appends one JSON object per line to ``path``, flushed as it comes (a live run's readings
    and forecasts); nothing is written before :meth:`open` or after :meth:`close`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, item: Any) -> None:
        """``item``: anything with ``to_json()`` (a reading, a forecast)."""
        if self._file is not None:
            self._file.write(json.dumps(item.to_json()) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_forecasts(run_dir: Path) -> list[ReceivedForecast]:
    """A live run's recorded forecasts (empty if it read none)."""
    path = Path(run_dir) / FORECASTS_FILE
    if not path.is_file():
        return []
    return [ReceivedForecast.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def forecasts_from_records(
    records: Sequence[ReceivedForecast], sites: Mapping[str, str]
) -> dict[str, Forecast]:
    """Per site (``sites``: site -> region), the :class:`Forecast` the run read: each forecast
    issued at its effective instant (a site that read none gets an empty one, not a made-up one)."""
    forecasts = {}
    for site, region in sites.items():
        mine: dict[float, ReceivedForecast] = {}
        for record in records:
            if record.site == site:
                mine[record.effective_t_s] = record  # one per instant: the newest read
        ordered = [mine[t] for t in sorted(mine)]
        offsets = np.concatenate(([0], np.cumsum([len(r.targets_s) for r in ordered]))).astype(int)
        forecasts[site] = Forecast(
            region,
            np.array([r.effective_t_s for r in ordered], dtype=float),
            offsets,
            np.array([t for r in ordered for t in r.targets_s], dtype=float),
            np.array([v for r in ordered for v in r.ci_g_per_kwh], dtype=float),
            ordered[-1].source if ordered else "live (none received)",
        )
    return forecasts


__all__ = [
    "FORECASTS_FILE", "JsonLinesRecord", "LiveForecast", "LiveForecasts", "ReceivedForecast",
    "forecasts_from_records", "read_forecasts",
]
