"""The carbon-signal source seam: one interface for live APIs and for file traces.

A :class:`CarbonSource` answers three questions about a grid region, always in gCO2/kWh and
UTC epoch seconds, with the planning layer's own types:

- :meth:`~CarbonSource.latest` — the newest value (a :class:`Reading`);
- :meth:`~CarbonSource.history` — a past span as a :class:`~curtail.planning.signals.Signal`,
  the type :func:`curtail.planning.traces.load_trace` returns;
- :meth:`~CarbonSource.forecast` — the forecast issued now as a
  :class:`~curtail.planning.traces.Forecast`, the type ``load_forecast`` returns.

Built-ins: :class:`TraceFileSource` (a trace CSV replayed on a clock) here; WattTime
(``curtail.sources.watttime``), Electricity Maps (``curtail.sources.electricitymaps``) and a
Vessim-compatible HTTP source (``curtail.sources.vessim``) beside it. Failures are typed
(:class:`SourceError` and subclasses) so a caller — the :class:`~curtail.sources.poller.RealtimePoller`
— can degrade instead of crash. Credentials are :class:`Secret` values read from the environment:
their ``repr``/``str`` is ``***`` and every error message is scrubbed of them.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curtail.planning.signals import Signal, iso, iso_array
from curtail.planning.traces import LBS_PER_MWH_TO_G_PER_KWH, Forecast, TraceSet, load_trace

UNIT_TO_G_PER_KWH = {
    "g_per_kwh": 1.0,
    "gco2eq/kwh": 1.0,
    "g_co2_per_kwh": 1.0,
    "kg_co2_per_mwh": 1.0,
    "lbs_co2_per_mwh": LBS_PER_MWH_TO_G_PER_KWH,
    "lbs_per_mwh": LBS_PER_MWH_TO_G_PER_KWH,
}
"""Units the sources report, to gCO2/kWh (WattTime MOER comes in lbs CO2/MWh)."""

REDACTED = "***"

_KNOWN_SECRETS: set[str] = set()
"""Every credential value this process has seen: any message is scrubbed of all of them, so a
server echoing another service's key back cannot leak it either."""


_SECRET_VARIABLE = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_KEY|APIKEY|AUTH", re.IGNORECASE)


def _environment_secrets() -> set[str]:
    """Values of credential-looking environment variables (``*PASSWORD*``, ``*TOKEN*``, ``*API_KEY*``…):
    scrubbed even before a source has read them, in case a server echoes one back."""
    return {
        value
        for name, value in os.environ.items()
        if _SECRET_VARIABLE.search(name) and len(value) >= 8
    }


def register_secret(value: str) -> None:
    """Scrub ``value`` (and its base64 form) from every source message from now on."""
    if len(value) >= 4:  # shorter ones cannot be scrubbed without mangling messages
        _KNOWN_SECRETS.add(value)


# --------------------------------------------------------------------------------------------
# Errors: what went wrong, typed, with the secrets scrubbed


class SourceError(RuntimeError):
    """A carbon source could not answer. ``source`` names it; the message says what to do."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class SourceUnavailable(SourceError):
    """Network error, timeout, rate limit or server error: try again later or fall back."""


class SourceAuthError(SourceError):
    """Missing or rejected credentials (HTTP 401/403, or the environment variable is unset)."""


class SourceRequestError(SourceError):
    """The source refused the request itself (unknown region, bad dates): fix the request."""


class SourceDataError(SourceError):
    """The answer was not what the API documents (missing fields, NaN, unknown unit)."""


class Secret:
    """A credential that never prints: ``repr``/``str`` give ``***``; :meth:`reveal` gives the value."""

    __slots__ = ("_value", "name")

    def __init__(self, value: str, name: str = "secret"):
        if not value:
            raise ValueError(f"{name} is empty")
        self._value = value
        self.name = name
        register_secret(value)

    @classmethod
    def from_env(cls, variable: str, *, source: str) -> Secret:
        """Read a credential from the environment; a missing one is a :class:`SourceAuthError` naming it."""
        value = os.environ.get(variable, "")
        if not value:
            raise SourceAuthError(
                source,
                f"environment variable {variable} is not set; export it (never put credentials in configs)",
            )
        return cls(value, variable)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.name}={REDACTED})"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into Ray objects, run directories or caches
        raise TypeError(f"{self!r} cannot be pickled")


def scrub(text: str, secrets: Iterable[Secret | str | None] = ()) -> str:
    """``text`` with every known secret value (and its base64 form) replaced by ``***``."""
    import base64

    values = _KNOWN_SECRETS | _environment_secrets()
    values.update(s.reveal() if isinstance(s, Secret) else s for s in secrets if s)
    for value in sorted(values, key=len, reverse=True):  # longest first: no partial leftovers
        if len(value) < 4:
            continue
        text = text.replace(value, REDACTED)
        text = text.replace(base64.b64encode(value.encode()).decode(), REDACTED)
    return text


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Reading:
    """One carbon-intensity value of a region: valid from ``t_s`` (the data point's own time)."""

    region: str
    t_s: float
    ci_g_per_kwh: float
    source: str
    kind: str = "marginal"
    fetched_s: float = math.nan  # wall clock when it was fetched (nan: replayed from a file)
    stale: bool = False  # served from the cache after the source failed
    fallback: bool = False  # served by the fallback source

    def __str__(self) -> str:
        flags = "".join(
            f" [{f}]" for f, on in (("stale", self.stale), ("fallback", self.fallback)) if on
        )
        return (
            f"{self.region} {iso(self.t_s)} {self.ci_g_per_kwh:.1f} gCO2/kWh ({self.source}){flags}"
        )


@dataclass(frozen=True)
class SignalIndex:
    """WattTime's real-time signal index: where the current MOER sits among the region's recent
    values, 0 (cleanest) to 100 (dirtiest). A percentile, not an intensity, so not a Signal."""

    region: str
    t_s: float
    percentile: float
    source: str


def parse_instant(source: str, text: object) -> float:
    """An API timestamp (ISO-8601 with a zone) as UTC epoch seconds; naive ones are refused."""
    import pandas as pd

    try:
        stamp = pd.Timestamp(str(text))
    except (ValueError, TypeError):
        raise SourceDataError(source, f"cannot read timestamp {text!r}") from None
    if stamp.tzinfo is None:
        raise SourceDataError(source, f"timestamp {text!r} has no time zone")
    return stamp.timestamp()


def to_g_per_kwh(source: str, unit: str, values: np.ndarray) -> np.ndarray:
    """Convert once, by unit name; unknown units are an error, never a guess."""
    key = unit.strip().lower()
    if key not in UNIT_TO_G_PER_KWH:
        raise SourceDataError(source, f"unknown unit {unit!r}; known: {sorted(UNIT_TO_G_PER_KWH)}")
    return np.asarray(values, dtype=float) * UNIT_TO_G_PER_KWH[key]


def make_signal(
    source: str,
    region: str,
    times_s: Sequence[float],
    values_g_per_kwh: Sequence[float],
    *,
    kind: str,
    resolution_s: float | None = None,
) -> Signal:
    """Validate points (any order, duplicates keep the last) into a Signal."""
    times = np.asarray(times_s, dtype=float)
    values = np.asarray(values_g_per_kwh, dtype=float)
    if len(times) == 0:
        raise SourceDataError(source, f"no data points for region {region!r}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        bad = int(np.flatnonzero(~np.isfinite(values) | (values < 0))[0])
        raise SourceDataError(
            source, f"region {region!r}: invalid value {values[bad]!r} at {iso(times[bad])}"
        )
    order = np.argsort(times, kind="stable")
    times, values = times[order], values[order]
    keep = np.append(times[1:] != times[:-1], True)  # the last of equal timestamps wins
    times, values = times[keep], values[keep]
    if resolution_s is None:
        steps = np.diff(times)
        resolution_s = float(np.median(steps)) if len(steps) else 300.0
    return Signal(region, times, values, float(resolution_s), kind, source)


def make_forecast(
    source: str, region: str, issues: Sequence[tuple[float, Sequence[float], Sequence[float]]]
) -> Forecast:
    """Forecast from ``(request_s, target_s[], g_per_kwh[])`` issues, in the file loader's layout."""
    if not issues:
        raise SourceDataError(source, f"no forecast for region {region!r}")
    issues = sorted(issues, key=lambda issue: issue[0])
    requests, targets, values, offsets = [], [], [], [0]
    for request_s, target_s, ci in issues:
        order = np.argsort(np.asarray(target_s, dtype=float), kind="stable")
        target = np.asarray(target_s, dtype=float)[order]
        value = np.asarray(ci, dtype=float)[order]
        if not np.all(np.isfinite(value)):
            raise SourceDataError(
                source, f"forecast for {region!r} issued {iso(request_s)} has non-numeric values"
            )
        if requests and request_s == requests[-1]:
            raise SourceDataError(
                source, f"two forecasts for {region!r} issued at {iso(request_s)}"
            )
        requests.append(float(request_s))
        targets.append(target)
        values.append(value)
        offsets.append(offsets[-1] + len(target))
    return Forecast(
        region,
        np.array(requests),
        np.array(offsets),
        np.concatenate(targets),
        np.concatenate(values),
        source,
    )


def write_trace_csv(signals: Mapping[str, Signal] | Iterable[Signal], path: str | Path) -> Path:
    """Record signals as a trace CSV that ``[[traces]]`` (``load_trace``) reads back unchanged.

    One ``time`` column (ISO-8601 UTC) and one gCO2/kWh column per region; regions sampled at
    different instants leave empty cells, so give one file per region in that case.
    """
    signals = list(signals.values()) if isinstance(signals, Mapping) else list(signals)
    times = np.unique(np.concatenate([s.times_s for s in signals]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = []
    for signal in signals:
        if not np.array_equal(signal.times_s, times):
            raise ValueError(
                f"region {signal.region!r} is sampled at other instants; write one file per region"
            )
        columns.append(signal.ci_g_per_kwh)
    stamps = [t.replace("Z", "+00:00") for t in iso_array(times)]
    lines = ["time," + ",".join(s.region for s in signals)]
    lines += [
        f"{stamp}," + ",".join(f"{column[i]:.6g}" for column in columns)
        for i, stamp in enumerate(stamps)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The seam


class CarbonSource(ABC):
    """Where carbon intensity comes from (see the module doc). Units: gCO2/kWh, UTC epoch seconds."""

    name: str = "source"
    kind: str = "marginal"  # "marginal" (WattTime MOER) or "average" (Electricity Maps)

    @abstractmethod
    def latest(self, region: str, now_s: float | None = None) -> Reading:
        """The newest value; live sources ignore ``now_s``, replayed ones need it."""

    def history(self, region: str, start_s: float, end_s: float) -> Signal:
        """Values over ``[start_s, end_s)``."""
        raise SourceRequestError(self.name, "has no history")

    def forecast(
        self, region: str, now_s: float | None = None, *, horizon_s: float = 24 * 3600
    ) -> Forecast:
        """The forecast issued at (or just before) ``now_s``, ``horizon_s`` ahead."""
        raise SourceRequestError(self.name, "has no forecast")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


@dataclass
class TraceFileSource(CarbonSource):
    """A trace file (or loaded :class:`TraceSet`) behind the same interface: the fallback of a
    live source, and the replay of recorded live signals."""

    traces: TraceSet
    forecasts: Mapping[str, Forecast] = field(default_factory=dict)
    name: str = "trace-file"

    @classmethod
    def from_csv(cls, path: str | Path, **trace_options) -> TraceFileSource:
        from curtail.config import TraceSource

        return cls(
            load_trace(TraceSource(path=Path(path), **trace_options)),
            name=f"trace-file:{Path(path).name}",
        )

    def _signal(self, region: str) -> Signal:
        if region not in self.traces.signals:
            raise SourceRequestError(
                self.name, f"no region {region!r}; regions: {sorted(self.traces.signals)}"
            )
        return self.traces.signals[region]

    def latest(self, region: str, now_s: float | None = None) -> Reading:
        if now_s is None:
            raise SourceRequestError(self.name, "a replayed trace needs the clock: pass now_s")
        signal = self._signal(region)
        if not signal.start_s <= now_s < signal.end_s:
            raise SourceUnavailable(
                self.name,
                f"{iso(now_s)} is outside region {region!r}'s trace "
                f"({iso(signal.start_s)} .. {iso(signal.end_s)})",
            )
        index = int(np.searchsorted(signal.times_s, now_s, side="right")) - 1
        return Reading(
            region,
            float(signal.times_s[index]),
            float(signal.ci_g_per_kwh[index]),
            self.name,
            signal.kind,
        )

    def history(self, region: str, start_s: float, end_s: float) -> Signal:
        return self._signal(region).slice(start_s, end_s)

    def forecast(
        self, region: str, now_s: float | None = None, *, horizon_s: float = 24 * 3600
    ) -> Forecast:
        """The forecast issued at or before ``now_s`` (every recorded one without ``now_s``)."""
        if region not in self.forecasts:
            raise SourceRequestError(self.name, f"no forecast for region {region!r}")
        recorded = self.forecasts[region]
        if now_s is None:
            return recorded
        issued = recorded.latest(now_s)
        if issued is None:
            raise SourceUnavailable(self.name, f"no forecast for region {region!r} issued by {iso(now_s)}")
        index = int(np.searchsorted(recorded.request_s, now_s, side="right")) - 1
        targets, values = issued
        return make_forecast(self.name, region, [(float(recorded.request_s[index]), targets, values)])
