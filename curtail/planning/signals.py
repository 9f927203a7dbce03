"""Carbon-intensity signals: piecewise-constant time series with exact integrals.

A :class:`Signal` is one region's carbon intensity in gCO2/kWh, sampled at instants
``times_s`` (UTC epoch seconds). Each sample holds until the next one; the last sample holds
for one resolution step. Integrals over any interval are exact and vectorised (prefix sums),
which is what makes a year of simulation take milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np


def to_epoch_s(instant: datetime) -> float:
    """A tz-aware datetime as UTC epoch seconds."""
    if instant.tzinfo is None:
        raise ValueError(f"instant {instant} has no time zone; give a tz-aware datetime")
    return instant.timestamp()


def from_epoch_s(t_s: float) -> datetime:
    return datetime.fromtimestamp(float(t_s), tz=UTC)


def iso(t_s: float) -> str:
    """UTC ISO-8601 with a Z suffix, second resolution (for events and reports)."""
    return from_epoch_s(t_s).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_array(t_s: np.ndarray) -> np.ndarray:
    """Vectorised :func:`iso` for many instants."""
    stamps = (np.asarray(t_s, dtype=float) * 1e3).round().astype("datetime64[ms]")
    return np.char.add(np.datetime_as_string(stamps, unit="s"), "Z")


@dataclass(frozen=True)
class StepFunction:
    """A piecewise-constant function: ``values[i]`` on ``[times_s[i], times_s[i+1])``.

    The last value holds until ``end_s``; outside ``[times_s[0], end_s)`` the function is 0
    for integration purposes (callers validate spans before integrating).
    """

    times_s: np.ndarray
    values: np.ndarray
    end_s: float
    _cumulative: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        edges = np.append(self.times_s, self.end_s)
        cumulative = np.concatenate(([0.0], np.cumsum(self.values * np.diff(edges))))
        object.__setattr__(self, "_cumulative", cumulative)

    @property
    def start_s(self) -> float:
        return float(self.times_s[0])

    def value_at(self, t_s: float | np.ndarray) -> np.ndarray | float:
        index = np.searchsorted(self.times_s, t_s, side="right") - 1
        index = np.clip(index, 0, len(self.values) - 1)
        return self.values[index]

    def antiderivative(self, t_s: float | np.ndarray) -> np.ndarray:
        """∫ from start to t (t clipped into the signal's span)."""
        t = np.clip(np.asarray(t_s, dtype=float), self.times_s[0], self.end_s)
        index = np.clip(np.searchsorted(self.times_s, t, side="right") - 1, 0, len(self.values) - 1)
        return self._cumulative[index] + self.values[index] * (t - self.times_s[index])

    def integral(self, start_s: float | np.ndarray, end_s: float | np.ndarray) -> np.ndarray:
        """∫ value dt over [start, end] in value·seconds (vectorised)."""
        return self.antiderivative(end_s) - self.antiderivative(start_s)

    def mean(self, start_s: float, end_s: float) -> float:
        if end_s <= start_s:
            return float(self.value_at(start_s))
        return float(self.integral(start_s, end_s)) / (end_s - start_s)


@dataclass(frozen=True)
class Signal:
    """One region's carbon intensity (gCO2/kWh), validated and in UTC."""

    region: str
    times_s: np.ndarray
    ci_g_per_kwh: np.ndarray
    resolution_s: float
    kind: str = "marginal"
    source: str = ""

    step: StepFunction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert len(self.times_s) == len(self.ci_g_per_kwh) > 0
        assert np.all(np.diff(self.times_s) > 0), "signal times must be strictly increasing"
        object.__setattr__(
            self, "step", StepFunction(self.times_s, self.ci_g_per_kwh, self.end_s)
        )

    @property
    def start_s(self) -> float:
        return float(self.times_s[0])

    @property
    def end_s(self) -> float:
        """End of the last sample's validity (last timestamp + one resolution step)."""
        return float(self.times_s[-1] + self.resolution_s)

    def value_at(self, t_s: float) -> float:
        return float(self.step.value_at(t_s))

    def slice(self, start_s: float, end_s: float) -> Signal:
        """The samples whose validity overlaps [start, end)."""
        keep = (self.times_s + self.resolution_s > start_s) & (self.times_s < end_s)
        return Signal(
            self.region, self.times_s[keep], self.ci_g_per_kwh[keep], self.resolution_s, self.kind, self.source
        )
