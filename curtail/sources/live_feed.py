"""A live run's signal: a configured source polled on the run's clock, its faults as events,
every reading recorded.

:class:`PollingFeed` is the :class:`~curtail.planning.live_calendar.SignalFeed` over live
sources: at each instant the calendar asks about, it reads every site's region through a
:class:`~curtail.sources.poller.RealtimePoller` (cache, typed failure events, the fallback source)
and hands over what is new. While a region's signal is lost it hands over one reading of
``lost_ci_g_per_kwh`` (by default never curtailed: the window closes after the hysteresis).

:class:`LiveSignal` builds the whole chain from ``[live]`` (:class:`~curtail.config.LiveConfig`):
the source (a served trace starts its :class:`~curtail.sources.trace_server.TraceServer` here),
the poller, the feed, the :class:`~curtail.planning.live_calendar.LiveCalendar`, the forecasts a
forecast-reading policy reads (:mod:`curtail.sources.live_forecasts`), and the records
``live_readings.jsonl`` and ``live_forecasts.jsonl`` in the run directory (one JSON line per
reading or forecast as the run used it, flushed as it arrives), from which ``curtail replay``
simulates the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from curtail.config import ExperimentConfig, LiveConfig, LiveSourceConfig, RunSpec, ServedFault
from curtail.planning.live_calendar import AppliedReading, FedReading, LiveCalendar
from curtail.planning.traces import load_trace
from curtail.sources.base import CarbonSource, SourceError, TraceFileSource
from curtail.sources.live_forecasts import (
    FORECASTS_FILE,
    JsonLinesRecord,
    LiveForecast,
    LiveForecasts,
    read_forecasts,
)
from curtail.sources.poller import RealtimePoller, SignalLost, SourceEvent

READINGS_FILE = "live_readings.jsonl"
"""A live run's readings as it used them, one JSON object per line (:class:`AppliedReading`)."""

CLOCK_FILE = "live_clock.json"
"""When a live run's clock started: ``start_s`` (run time) at ``wall_start_s`` (wall), ``speedup``."""

SignalEventSink = Callable[[float, str, str, dict[str, Any]], None]
"""Called with ``(t_s, site, event, details)`` for every signal event (``signal_failed``, ...);
``t_s`` is the run's clock."""

_SERVED_USER_ENV = "CURTAIL_SERVED_TRACE_USER"  # a served trace takes any credentials
_SERVED_PASSWORD_ENV = "CURTAIL_SERVED_TRACE_PASSWORD"


class PollingFeed:
    """A :class:`~curtail.planning.live_calendar.SignalFeed` over a poller (see the module doc)."""

    def __init__(self, regions: Mapping[str, str], poller: RealtimePoller, *, lost_ci_g_per_kwh: float):
        self.regions = dict(regions)  # site -> the source's region name
        self.poller = poller
        self.lost_ci_g_per_kwh = lost_ci_g_per_kwh
        self._newest: dict[str, float] = {}  # site -> newest sample time handed over
        self._lost: set[str] = set()

    def resume(self, readings: Sequence[AppliedReading]) -> None:
        """Go on after the readings a run had used before it went down (nothing is handed twice)."""
        for reading in readings:
            if reading.origin != "lost":
                self._newest[reading.site] = max(reading.sample_t_s, self._newest.get(reading.site, -float("inf")))

    def readings_until(self, t_s: float) -> list[FedReading]:
        readings = []
        for site, region in self.regions.items():
            try:
                reading = self.poller.read(region, t_s)
            except SignalLost:
                if site not in self._lost:  # once per outage: the assumed value holds until news
                    self._lost.add(site)
                    readings.append(FedReading(site, t_s, self.lost_ci_g_per_kwh, "lost"))
                continue
            if reading.stale:  # nothing new
                continue
            if reading.t_s > t_s:  # the source is ahead of the run: take what it published up to t_s
                readings += self._history(site, region, t_s)
                continue
            recovering = site in self._lost
            if reading.t_s <= self._newest.get(site, -float("inf")) and not recovering:
                continue
            self._lost.discard(site)
            self._newest[site] = max(reading.t_s, self._newest.get(site, -float("inf")))
            readings.append(
                FedReading(site, reading.t_s, reading.ci_g_per_kwh, "fallback" if reading.fallback else "source")
            )
        return readings

    def _history(self, site: str, region: str, t_s: float) -> list[FedReading]:
        """The samples after the newest handed over and up to ``t_s``, from the source's history
        (a run behind its source's clock would otherwise skip them); none if it has no history."""
        newest = self._newest.get(site, t_s - 3600.0)
        try:
            signal = self.poller.source.history(region, newest + 1e-3, t_s + 1e-3)
        except SourceError:
            return []
        keep = [(float(t), float(v)) for t, v in zip(signal.times_s, signal.ci_g_per_kwh) if newest < t <= t_s]
        if keep:
            self._newest[site] = keep[-1][0]
            self._lost.discard(site)
        return [FedReading(site, t, v) for t, v in keep]


def open_source(config: LiveSourceConfig, *, speedup: float) -> tuple[CarbonSource, Any]:
    """The configured source, and the trace server behind it (None unless ``served_trace``).
    A served trace's server is created here and started by :meth:`LiveSignal.begin`."""
    from curtail.sources.electricitymaps import ElectricityMapsSource
    from curtail.sources.trace_server import TraceServer
    from curtail.sources.vessim import VessimHttpSource
    from curtail.sources.watttime import WattTimeSource

    def url(default: dict[str, Any]) -> dict[str, Any]:
        return {**default, **({"base_url": config.base_url} if config.base_url else {})}

    if config.kind == "served_trace":
        assert config.path is not None  # the config validates it
        server = TraceServer.from_csv(
            config.path, naive_timezone=config.naive_timezone, speedup=speedup, forecast_path=config.forecast_path,
            forecast_region=config.forecast_region, synthetic_forecast_seed=config.synthetic_forecast_seed,
        )
        os.environ.setdefault(_SERVED_USER_ENV, "curtail")
        os.environ.setdefault(_SERVED_PASSWORD_ENV, "served-trace")
        return _ServedSource(server, config.timeout_s, config.faults), server
    if config.kind == "watttime":
        return WattTimeSource(**url({"timeout_s": config.timeout_s})), None
    if config.kind == "electricitymaps":
        return ElectricityMapsSource(**url({"timeout_s": config.timeout_s})), None
    if config.base_url is None:
        raise ValueError("a vessim source needs base_url = its API's address")
    return VessimHttpSource(config.base_url, timeout_s=config.timeout_s), None


class _ServedSource(CarbonSource):
    """The WattTime client pointed at a trace server once it runs (its port is known then); arms
    the configured faults on the server as its clock reaches them."""

    def __init__(self, server: Any, timeout_s: float, faults: Sequence[ServedFault] = ()):
        self.server = server
        self.timeout_s = timeout_s
        self.name = "served-trace"
        self._client: CarbonSource | None = None
        self._faults = sorted(faults, key=lambda fault: fault.at_s)
        self._ends: list[tuple[float, str]] = []  # (trace time, "clear" | "restart")
        self.injected: list[tuple[float, str]] = []  # (trace time, kind): what was armed when
        self._run_start_s: float | None = None  # faults are timed from the run's start

    def resume(self, run_start_s: float, now_s: float) -> None:
        """A resumed run: faults stay timed from the run's start; those already past are dropped."""
        self._run_start_s = run_start_s
        self._faults = [fault for fault in self._faults if run_start_s + fault.at_s >= now_s]

    def _arm_due_faults(self, run_now_s: float | None) -> None:
        """Arm the faults due by the run's clock (the instant asked about): a run that lags the
        wall (a worker group starting blocks it) meets them when it gets there, in order."""
        now_s = self.server.now_s() if run_now_s is None else run_now_s
        elapsed_s = now_s - (self.server.start_s if self._run_start_s is None else self._run_start_s)
        for end_s, action in [e for e in self._ends if e[0] <= now_s]:
            self._ends.remove((end_s, action))
            self.server.faults.clear() if action == "clear" else self.server.restart()
        while self._faults and self._faults[0].at_s <= elapsed_s:
            fault = self._faults.pop(0)
            self.injected.append((now_s, fault.kind))
            faults = self.server.faults
            if fault.kind == "server_errors":
                faults.fail_next(fault.count)
            elif fault.kind == "slow":
                faults.slow_next(fault.count, delay_s=fault.delay_s)
            elif fault.kind == "rate_limit":
                faults.rate_limit_next(fault.count)
            elif fault.kind == "refuse_credentials":
                faults.refuse_logins()
                faults.revoke_tokens()
                self._ends.append((now_s + fault.duration_s, "clear"))
            else:  # down
                self.server.stop()
                self._ends.append((now_s + fault.duration_s, "restart"))

    def _source(self) -> CarbonSource:
        if self._client is None:
            from curtail.sources.watttime import WattTimeSource

            self._client = WattTimeSource(
                base_url=self.server.url, user_env=_SERVED_USER_ENV, password_env=_SERVED_PASSWORD_ENV,
                timeout_s=self.timeout_s,
            )
        return self._client

    def latest(self, region: str, now_s: float | None = None):  # type: ignore[no-untyped-def]
        self._arm_due_faults(now_s)
        return self._source().latest(region, now_s)

    def history(self, region: str, start_s: float, end_s: float):  # type: ignore[no-untyped-def]
        self._arm_due_faults(end_s)
        return self._source().history(region, start_s, end_s)

    def forecast(self, region: str, now_s: float | None = None, *, horizon_s: float = 24 * 3600):  # type: ignore[no-untyped-def]
        self._arm_due_faults(now_s)
        return self._source().forecast(region, now_s, horizon_s=horizon_s)

    def forecast_history(self, region: str, start_s: float, end_s: float, *, horizon_s: float = 24 * 3600):  # type: ignore[no-untyped-def]
        self._arm_due_faults(end_s)
        return self._source().forecast_history(region, start_s, end_s, horizon_s=horizon_s)  # type: ignore[attr-defined]


class LiveSignal:
    """A live run's signal chain (see the module doc).

    >>> live = LiveSignal(experiment, run, run_dir, on_event=sink)
    >>> start_s = live.planned_start_s()   # the run's start, on the source's clock
    >>> live.begin(start_s)                # right before the run's clock starts
    >>> live.calendar.window_at("caiso", t_s)
    >>> live.close()
    """

    def __init__(
        self, experiment: ExperimentConfig, run: RunSpec, run_dir: Path, *, on_event: SignalEventSink | None = None
    ):
        if experiment.live is None:
            raise ValueError("LiveSignal needs an experiment with [live]")
        self.config: LiveConfig = experiment.live
        self.on_event = on_event
        self.source, self.server = open_source(self.config.source, speedup=experiment.training.realtime_speedup)
        regions = {site: experiment.sites[site].region for site in run.sites}
        self.source_regions = {site: self.config.source.regions.get(r, r) for site, r in regions.items()}
        fallback = None
        if self.config.fallback_trace is not None:
            fallback = TraceFileSource(load_trace(self.config.fallback_trace), name="fallback-trace")
        rules = experiment.rules_for(run)
        self.poller = RealtimePoller(
            self.source, sorted(set(self.source_regions.values())), refresh_s=0.0,  # asked only when due
            max_stale_s=self.config.max_stale_s, retry_s=self.config.retry_s, fallback=fallback,
            on_event=self._source_event,
        )
        self.feed = PollingFeed(self.source_regions, self.poller, lost_ci_g_per_kwh=self.config.lost_ci_g_per_kwh)
        self.calendar = LiveCalendar(
            list(run.sites), rules, self.feed, step_s=self.config.step_s, recheck_s=self.config.recheck_s,
            on_reading=self._record,
        )
        self.path = run_dir / READINGS_FILE
        self.clock_path = run_dir / CLOCK_FILE
        self.speedup = experiment.training.realtime_speedup
        self.readings_record = JsonLinesRecord(self.path)
        self.forecast_record = JsonLinesRecord(run_dir / FORECASTS_FILE)
        self.forecasts: LiveForecasts | None = None
        if getattr(run.policy, "forecast", "none") != "none":  # forecast and budget policies read them
            self.forecasts = LiveForecasts(
                self.source_regions, self.source, refresh_s=self.config.forecast_refresh_s,
                on_forecast=self.forecast_record.write, on_event=self._emit,
            )

    def site_forecasts(self) -> dict[str, LiveForecast]:
        """What a forecast-reading policy reads per site (empty if the run's policy reads none)."""
        if self.forecasts is None:
            return {}
        return {site: self.forecasts.for_site(site) for site in self.source_regions}

    def planned_start_s(self) -> float:
        """The run's start: a served trace's first sample; else now minus ``lag_s``. A run that
        resumes keeps the start it had (``live_clock.json``)."""
        if self.clock_path.is_file():
            return float(json.loads(self.clock_path.read_text())["start_s"])
        if self.server is not None:
            return self.server.start_s
        return time.time() - self.config.lag_s

    def begin(self, start_s: float) -> None:
        """Start a served trace's clock, open the record, pull the first readings, and write
        which wall instant the run's clock started at (``live_clock.json``, for a resume)."""
        self._open_records()
        if self.server is not None:
            self.server.start()
        self.calendar.start(start_s)
        self.clock_path.write_text(json.dumps({"start_s": start_s, "wall_start_s": time.time(),
                                               "speedup": self.speedup}))
        if self.forecasts is not None:
            self.forecasts.begin(start_s)

    def resume(self) -> float:
        """Go on after the run went down: the run's clock now (it never rewinds: the stretch since
        the run's checkpoint is lost), with the readings and forecasts it had recorded taken back
        and a served trace's clock where the wall says. Returns the instant the run resumes at."""
        clock = json.loads(self.clock_path.read_text())
        now_s = float(clock["start_s"]) + (time.time() - float(clock["wall_start_s"])) * float(clock["speedup"])
        self._open_records()
        readings = read_readings(self.path.parent)
        self.calendar.restore(readings)
        self.feed.resume(readings)
        if self.server is not None:
            self.server.start_s = now_s
            assert isinstance(self.source, _ServedSource)
            self.source.resume(float(clock["start_s"]), now_s)
            self.server.start()
        self.calendar.catch_up(now_s)
        if self.forecasts is not None:
            self.forecasts.restore(read_forecasts(self.path.parent), float(clock["start_s"]))
            self.forecasts.refresh(now_s)
        return now_s

    def _open_records(self) -> None:
        self.readings_record.open()
        if self.forecasts is not None:
            self.forecast_record.open()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.readings_record.close()
        self.forecast_record.close()

    def _record(self, reading: AppliedReading) -> None:
        self.readings_record.write(reading)
        if reading.late or reading.origin != "source":
            self._emit(reading.received_t_s, reading.site, "signal_reading", {
                "origin": reading.origin, "late": reading.late, "sample_t_s": reading.sample_t_s,
                "ci_g_per_kwh": reading.ci_g_per_kwh,
            })

    def _source_event(self, event: SourceEvent) -> None:
        for site, region in self.source_regions.items():
            if region == event.region:
                self._emit(event.t_s, site, f"signal_{event.kind}", {"source": event.source,
                                                                   "detail": event.detail[-300:]})

    def _emit(self, t_s: float, site: str, event: str, details: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(t_s, site, event, details)


def read_readings(run_dir: Path) -> list[AppliedReading]:
    """A live run's recorded readings (``live_readings.jsonl``), in the order the run used them."""
    path = Path(run_dir) / READINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded readings; is {run_dir} a live run's directory?")
    return [AppliedReading.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
