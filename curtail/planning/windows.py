"""The curtailment calendar: per-site windows from a signal, a threshold and hysteresis.

Rules (the prior system's, all configurable through :class:`~curtail.config.CurtailmentRules`):

* a site is *curtailed* while its carbon intensity is below the threshold: a fixed level
  (``threshold_kind = "absolute"``, marginal signals) or a trailing percentile of the site's
  own signal (``"percentile"``, average-CI traces; see :func:`curtailment_thresholds`);
* a window **opens** at the first poll that sees a sample below the threshold;
* it **closes** only after the signal stayed above the threshold for ``hysteresis_s``;
  a sample at or below the threshold cancels the countdown;
* the site is **provisioning** for ``provisioning_s`` after the window opens, then **ready**;
  while the close countdown runs it is **draining** (still allowed to train).

The calendar is causal: whether a window is open at ``t`` depends only on samples up to ``t``.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from curtail.config import CurtailmentRules
from curtail.planning.signals import Signal, StepFunction, iso

log = logging.getLogger(__name__)


class WindowState(enum.StrEnum):
    OFF = "off"
    PROVISIONING = "provisioning"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class Window:
    """One curtailment window of a site. ``close_s`` is the leave decision (or the trace end)."""

    site: str
    open_s: float
    close_s: float
    ready_s: float
    draining_s: tuple[tuple[float, float], ...] = ()  # countdowns that ran (cancelled or final)

    @property
    def duration_s(self) -> float:
        return self.close_s - self.open_s

    def state_at(self, t_s: float) -> WindowState:
        """The site's state at ``t_s`` as far as this window decides it."""
        if not self.open_s <= t_s < self.close_s:
            return WindowState.OFF
        if t_s < self.ready_s:
            return WindowState.PROVISIONING
        for a, b in self.draining_s:  # a loop, not any(): the simulator asks this per event
            if a <= t_s < b:
                return WindowState.DRAINING
        return WindowState.READY

    def __str__(self) -> str:
        return f"{self.site}: {iso(self.open_s)} .. {iso(self.close_s)} ({self.duration_s / 3600:.2f} h)"


def poll_at_or_after(t_s: float, origin_s: float, poll_s: float) -> float:
    """The first poll instant at or after ``t_s`` on a grid starting at ``origin_s``."""
    return origin_s + math.ceil((t_s - origin_s) / poll_s - 1e-9) * poll_s


def curtailment_thresholds(signal: Signal, rules: CurtailmentRules) -> np.ndarray:
    """The curtailment threshold in force at each sample (gCO2/kWh), causally.

    ``absolute``: ``threshold_g_per_kwh`` everywhere. ``percentile``: the
    ``threshold_percentile``-th percentile (linear interpolation) of the samples in
    ``(t - percentile_window_s, t]``, so a sample is compared only with the past and itself.
    Sample ``i`` is curtailed when ``values[i] < thresholds[i]``.
    """
    if rules.threshold_kind == "absolute":
        return np.full(len(signal.times_s), float(rules.threshold_g_per_kwh))
    index = pd.to_datetime(np.round(signal.times_s * 1e3).astype("int64"), unit="ms")
    series = pd.Series(signal.ci_g_per_kwh, index=index)
    window = pd.Timedelta(seconds=rules.percentile_window_s)
    rolling = series.rolling(window, min_periods=1).quantile(rules.threshold_percentile / 100.0)
    return rolling.to_numpy(dtype=float)


def warn_short_percentile_history(
    signals: Mapping[str, Signal], rules: CurtailmentRules, start_s: float
) -> dict[str, float]:
    """Warn (this module's logger) for every site whose trace holds less than
    ``percentile_window_s`` of history before the run starts at ``start_s``: its first
    thresholds are percentiles of a shorter past than the rule says (the first sample's, of
    itself alone). Returns those sites' history in seconds; nothing for an absolute rule."""
    if rules.threshold_kind != "percentile":
        return {}
    short = {
        site: max(start_s - signal.start_s, 0.0)
        for site, signal in signals.items()
        if start_s - signal.start_s < rules.percentile_window_s
    }
    for site, history_s in short.items():
        log.warning(
            "site %r: its trace (%s) has %.1f h of history before the run starts (%s), less than "
            "rules.percentile_window_s (%.1f h): its first curtailment thresholds are percentiles of "
            "a shorter past. Start the run later, load a trace that starts earlier, or shorten "
            "percentile_window_s",
            site,
            signals[site].source or signals[site].region,
            history_s / 3600,
            iso(start_s),
            rules.percentile_window_s / 3600,
        )
    return short


def compute_windows(
    site: str, signal: Signal, rules: CurtailmentRules, thresholds: np.ndarray | None = None
) -> list[Window]:
    """The site's windows under ``rules`` (vectorised over runs of samples).

    Equivalent to :func:`compute_windows_stepwise`, which walks the samples one by one and is
    kept as the readable definition (and test oracle). Falls back to it when polls are
    sparser than samples (some samples are never seen). ``thresholds`` (one per sample)
    defaults to :func:`curtailment_thresholds`.
    """
    times = signal.times_s
    values = signal.ci_g_per_kwh
    end_s = signal.end_s
    origin, poll_s = float(times[0]), rules.poll_s
    polls = origin + np.ceil((times - origin) / poll_s - 1e-9) * poll_s
    change_s = np.append(times[1:], end_s)  # when each sample is replaced
    threshold = curtailment_thresholds(signal, rules) if thresholds is None else thresholds
    if not np.all(polls < change_s):
        return compute_windows_stepwise(site, signal, rules, threshold)
    above = values > threshold
    # maximal runs of consecutive above-threshold samples: [first, after)
    edges = np.diff(np.concatenate(([False], above, [False])).astype(np.int8))
    run_first = np.flatnonzero(edges == 1)
    run_after = np.flatnonzero(edges == -1)
    run_start_s = polls[run_first]
    run_cancel_s = np.where(run_after < len(times), polls[np.minimum(run_after, len(times) - 1)], end_s)
    run_change_s = np.where(run_after < len(times), times[np.minimum(run_after, len(times) - 1)], end_s)
    run_leave_s = origin + np.ceil((run_start_s + rules.hysteresis_s - origin) / poll_s - 1e-9) * poll_s
    closes = run_leave_s < run_change_s
    # a run either closes the window (at its leave time) or is a countdown cancelled by the
    # next sample (or cut by the trace end)
    run_stop_s = np.where(closes, run_leave_s, run_cancel_s)
    close_s = run_leave_s[closes]
    below_s = polls[values < threshold]

    windows: list[Window] = []
    cursor = -math.inf
    while True:
        i = int(np.searchsorted(below_s, cursor, side="right"))
        if i == len(below_s):
            break
        open_s = float(below_s[i])
        j = int(np.searchsorted(close_s, open_s, side="right"))
        window_close_s = float(close_s[j]) if j < len(close_s) else end_s
        k0 = int(np.searchsorted(run_start_s, open_s, side="left"))
        k1 = int(np.searchsorted(run_start_s, window_close_s, side="left"))
        countdowns = tuple(
            (float(a), float(min(b, window_close_s))) for a, b in zip(run_start_s[k0:k1], run_stop_s[k0:k1])
        )
        ready = min(open_s + rules.provisioning_s, window_close_s)
        windows.append(Window(site, open_s, window_close_s, ready, countdowns))
        if j >= len(close_s):
            break
        cursor = window_close_s
    return windows


def compute_windows_stepwise(
    site: str, signal: Signal, rules: CurtailmentRules, thresholds: np.ndarray | None = None
) -> list[Window]:
    """Walk the samples once and apply the enter / leave rules (the reference definition)."""
    times = signal.times_s.tolist()
    values = signal.ci_g_per_kwh.tolist()
    levels = (curtailment_thresholds(signal, rules) if thresholds is None else thresholds).tolist()
    walk = WindowWalk(site, rules, origin_s=times[0])
    for index, (t, value, threshold) in enumerate(zip(times, values, levels)):
        walk.step(t, value, threshold, next_s=times[index + 1] if index + 1 < len(times) else signal.end_s)
    return walk.finish(signal.end_s)


class WindowWalk:
    """The enter / leave rules applied one sample at a time: the calendar's definition.

    Feed the samples in time order to :meth:`step`, each with the instant the next sample
    replaces it; :meth:`finish` cuts a window still open at the trace end. The offline
    :func:`compute_windows_stepwise` and the online calendar
    (:mod:`curtail.planning.online_calendar`) both run this walk, so they cannot disagree.
    Polls lie on a grid of ``rules.poll_s`` starting at ``origin_s`` (the first sample).
    """

    def __init__(self, site: str, rules: CurtailmentRules, origin_s: float):
        self.site = site
        self.rules = rules
        self.origin_s = origin_s
        self.windows: list[Window] = []
        self.open_s: float | None = None
        self.above_since_s: float | None = None
        self.countdowns: list[tuple[float, float]] = []

    def copy(self) -> WindowWalk:
        twin = WindowWalk(self.site, self.rules, self.origin_s)
        twin.windows, twin.countdowns = list(self.windows), list(self.countdowns)
        twin.open_s, twin.above_since_s = self.open_s, self.above_since_s
        return twin

    def step(self, t_s: float, value: float, threshold: float, next_s: float) -> None:
        """Apply the sample ``value`` (gCO2/kWh) holding on ``[t_s, next_s)``."""
        poll_t = poll_at_or_after(t_s, self.origin_s, self.rules.poll_s)
        if poll_t >= next_s:  # no poll sees this sample
            return
        if self.open_s is None:
            if value < threshold:
                self.open_s = poll_t
            return
        if value > threshold:
            if self.above_since_s is None:
                self.above_since_s = poll_t
            leave_t = poll_at_or_after(self.above_since_s + self.rules.hysteresis_s, self.origin_s, self.rules.poll_s)
            if leave_t < next_s:
                self._close_at(leave_t)
                # the same sample may not re-open the window: it is above the threshold
        else:
            if self.above_since_s is not None:
                self.countdowns.append((self.above_since_s, poll_t))
            self.above_since_s = None

    def finish(self, end_s: float) -> list[Window]:
        """The windows, a window still open cut at ``end_s`` (the trace end)."""
        if self.open_s is not None:
            self._close_at(end_s)
        return self.windows

    def _close_at(self, t_close: float) -> None:
        assert self.open_s is not None
        if self.above_since_s is not None and t_close > self.above_since_s:
            self.countdowns.append((self.above_since_s, t_close))
        ready = min(self.open_s + self.rules.provisioning_s, t_close)
        self.windows.append(Window(self.site, self.open_s, t_close, ready, tuple(self.countdowns)))
        self.open_s, self.above_since_s, self.countdowns = None, None, []


class CurtailmentCalendar:
    """Windows of every site, with state queries at any instant.

    >>> calendar = CurtailmentCalendar({"caiso": signal}, CurtailmentRules())
    >>> calendar.state_at("caiso", t_s), calendar.next_change_after(t_s)
    """

    def __init__(self, signals: dict[str, Signal], rules: CurtailmentRules):
        self.rules = rules
        self.signals = dict(signals)
        self._thresholds = {site: curtailment_thresholds(s, rules) for site, s in self.signals.items()}
        self._windows = {
            site: compute_windows(site, s, rules, self._thresholds[site]) for site, s in self.signals.items()
        }
        self._curtailed = {
            site: StepFunction(s.times_s, (s.ci_g_per_kwh < self._thresholds[site]).astype(float), s.end_s)
            for site, s in self.signals.items()
        }
        self._opens = {site: np.array([w.open_s for w in ws]) for site, ws in self._windows.items()}
        changes: list[float] = []
        for ws in self._windows.values():
            for w in ws:
                changes += [w.open_s, w.ready_s, w.close_s]
                for a, b in w.draining_s:
                    changes += [a, b]
        self._changes = np.unique(np.array(changes, dtype=float))
        self._change_list = self._changes.tolist()
        self._open_list = {site: opens.tolist() for site, opens in self._opens.items()}

    @property
    def sites(self) -> list[str]:
        return list(self.signals)

    def windows(self, site: str | None = None) -> list[Window]:
        """Windows of one site, or of every site sorted by opening time."""
        if site is not None:
            return list(self._windows[site])
        return sorted((w for ws in self._windows.values() for w in ws), key=lambda w: (w.open_s, w.site))

    def window_at(self, site: str, t_s: float) -> Window | None:
        index = bisect.bisect_right(self._open_list[site], t_s) - 1  # scalar lookups: bisect beats numpy
        if index >= 0:
            window = self._windows[site][index]
            if t_s < window.close_s:
                return window
        return None

    def state_at(self, site: str, t_s: float) -> WindowState:
        window = self.window_at(site, t_s)
        return WindowState.OFF if window is None else window.state_at(t_s)

    def states_at(self, t_s: float) -> dict[str, WindowState]:
        return {site: self.state_at(site, t_s) for site in self.signals}

    def next_change_after(self, t_s: float) -> float | None:
        """The next instant after ``t_s`` at which any site's state changes, or None."""
        index = bisect.bisect_right(self._change_list, t_s)
        return self._change_list[index] if index < len(self._change_list) else None

    def thresholds(self, site: str) -> np.ndarray:
        """The curtailment threshold (gCO2/kWh) in force at each of the site's samples."""
        return self._thresholds[site]

    def threshold_at(self, site: str, t_s: float) -> float:
        """The threshold in force at ``t_s`` (that of the sample holding then; causal)."""
        times = self.signals[site].times_s
        index = min(max(int(np.searchsorted(times, t_s, side="right")) - 1, 0), len(times) - 1)
        return float(self._thresholds[site][index])

    def curtailed(self, site: str) -> StepFunction:
        """1 while the site's signal is below the threshold, else 0 (for in-window shares)."""
        return self._curtailed[site]

    def curtailed_seconds(self, site: str, start_s: float, end_s: float) -> float:
        return float(self._curtailed[site].integral(start_s, end_s))
