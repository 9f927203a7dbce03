"""The forecast-aware policy: be ready when a window opens, skip short ones, do not flap.

The threshold policy (the prior system) provisions a site only once its window is open, so
every opening loses ``provisioning_s + group_start_s`` of curtailed time, and it keeps training
through the ``hysteresis_s`` countdown after the signal has risen. This policy reads the
newest forecast issued by ``now`` (recorded WattTime forecasts where the experiment has them,
else :func:`~curtail.planning.forecast.synthesize_forecast` from the calibrated error model;
never the future itself) and, per site:

* **trains** while the site's *observed* signal is below its curtailment threshold;
* **pre-provisions** (``STANDBY``) when the forecast puts an opening within
  ``provisioning_s + group_start_s + lead_s``, so the site is ready as the window opens;
* **skips** windows whose predicted training time after start-up is under ``min_window_s``;
* **bridges** gaps: a provisioned site whose signal rose stays ``STANDBY`` (idle, not
  training) when the forecast reopens its window within ``bridge_s``, instead of releasing
  the nodes and paying start-up again; otherwise it is released at once (no training outside
  the window, unlike the hysteresis countdown).

Without a forecast (``forecast = "none"``, or no forecast issued yet) it falls back cleanly:
no pre-provisioning, no skipping, and a released window is bridged for ``hold_s`` (a
persistence hysteresis that idles instead of training).
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from curtail.config import ForecastChoice, ForecastParams
from curtail.planning.forecast import (
    WATTTIME_CAISO_2023_06,
    ArrivingForecasts,
    IssuedForecasts,
    Outlook,
    outlook_of,
    synthesize_forecast,
)
from curtail.planning.live_calendar import LiveCalendar
from curtail.planning.policy import (
    Decision,
    Intent,
    Observation,
    Policy,
    PolicyContext,
    SiteState,
    register_policy,
)
from curtail.planning.traces import Forecast

_EPS_S = 1e-6


def site_forecasts(
    context: PolicyContext,
    choice: ForecastChoice,
    *,
    seed: int,
    horizon_s: float,
    error_scale: float = 1.0,
) -> dict[str, IssuedForecasts | None]:
    """The forecast each site's policy may read.

    ``recorded``: the experiment's forecasts (None for sites without); ``synthetic``: made from
    the signal by the calibrated error model with every error times ``error_scale`` (0: perfect
    over the horizon; seeded by the run's seed and the site's name); ``auto``: recorded where there
    are some, else synthetic; ``none``: no forecasts. A live run's forecasts are its source's
    (recorded and auto); the error model needs the future it perturbs, which a live run lacks.
    """
    live = isinstance(context.calendar, LiveCalendar)
    if live and choice == "synthetic":
        raise ValueError(
            "a live run cannot synthesize forecasts (the error model perturbs the future): use "
            "forecast = 'auto' for the source's forecasts, or serve a trace with synthetic ones"
        )
    forecasts: dict[str, IssuedForecasts | None] = {}
    for site in context.sites:
        recorded = context.forecasts.get(site)
        if choice == "none" or (choice == "recorded" and recorded is None) or (live and recorded is None):
            forecasts[site] = None
        elif choice in ("recorded", "auto") and recorded is not None:
            forecasts[site] = recorded
        else:
            forecasts[site] = synthesize_forecast(
                context.signals[site],
                model=WATTTIME_CAISO_2023_06 if error_scale == 1.0 else WATTTIME_CAISO_2023_06.scaled(error_scale),
                thresholds=context.calendar.thresholds(site),
                seed=seed,
                site=site,  # noise from the name, not the order (noise_seed)
                horizon_s=horizon_s,
            )
    return forecasts


class ForecastAwarePolicy(Policy):
    """Pre-provision from honest forecasts; skip short windows; bridge short gaps.

    Configured by :class:`~curtail.config.ForecastPolicyConfig` (every parameter, its default
    and its meaning: :class:`~curtail.config.ForecastParams`).
    """

    kind = "forecast"
    config: ForecastParams

    def __init__(self, context: PolicyContext, config: ForecastParams | None = None):
        super().__init__(context, config)
        config = self.config
        self.startup_s = context.rules.provisioning_s + context.execution.group_start_s
        self.forecasts = site_forecasts(
            context,
            config.forecast,
            seed=config.forecast_seed,
            horizon_s=config.forecast_horizon_s,
            error_scale=config.forecast_error_scale,
        )
        self._above_since: dict[str, float] = {}
        self._live = isinstance(context.calendar, LiveCalendar)
        if self._live:  # the past grows: windows and wake-ups are read as the run goes
            self._window_spans: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            self._wake_instants = np.array([])
            return
        self._window_spans = {site: self._spans(site) for site in context.sites}
        instants = [s.times_s for s in context.signals.values()]
        instants += [f.request_s for f in self.forecasts.values() if isinstance(f, Forecast)]
        self._wake_instants = np.unique(np.concatenate(instants))

    # ------------------------------------------------------------------ hooks for subclasses

    def level(self, site: str, now_s: float, observation: Observation) -> float:
        """The intensity (gCO2/kWh) below which ``site`` should train now."""
        return self.context.calendar.threshold_at(site, now_s)

    def worth_starting(
        self, site: str, now_s: float, level: float, outlook: Outlook | None
    ) -> bool:
        """Is an unprovisioned site, below ``level`` now, worth the start-up?"""
        if self.config.min_window_s <= 0:
            return True
        return self.predicted_training_s(site, now_s, level, outlook) >= self.config.min_window_s

    def predicted_training_s(
        self, site: str, now_s: float, level: float, outlook: Outlook | None
    ) -> float:
        """Training time a start now would buy: the longer of what the forecast shows and the
        median window of the past ``history_s`` (``inf`` if the forecast sees no end).

        WattTime's forecasts lean on persistence and end a running window too early about a
        third of the time, so a short forecast window alone is not believed.
        """
        closes_s = outlook.first_at_or_above(level) if outlook is not None else math.inf
        return max(closes_s - now_s, self.typical_window_s(site, now_s)) - self.startup_s

    def typical_window_s(self, site: str, now_s: float) -> float:
        """Median length of the site's calendar windows closed in the past ``history_s`` (0: none)."""
        opens, closes = self._spans(site) if self._live else self._window_spans[site]
        recent = (closes <= now_s) & (closes > now_s - self.config.history_s)
        return float(np.median(closes[recent] - opens[recent])) if recent.any() else 0.0

    def _spans(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        windows = self.context.calendar.windows(site)
        return np.array([w.open_s for w in windows]), np.array([w.close_s for w in windows])

    # ------------------------------------------------------------------ the decision

    def decide(self, now_s: float, observation: Observation) -> Decision:
        intents: dict[str, Intent] = {}
        wake_s = self._next_news_s(now_s)
        for site in self.context.sites:
            intent, site_wake_s = self._site_intent(site, now_s, observation)
            intents[site] = intent
            if site_wake_s > now_s + _EPS_S:
                wake_s = min(wake_s, site_wake_s)
        return Decision(intents, wake_s)

    def _next_news_s(self, now_s: float) -> float:
        """The next instant the signal or a forecast can change: the next sample or issue of a
        trace; live, the calendar's next change or reading due and the next forecast fetch."""
        if self._live:
            assert isinstance(self.context.calendar, LiveCalendar)
            wake_s = self.context.calendar.next_change_after(now_s)  # also pulls readings up to now
            for forecast in self.forecasts.values():
                if forecast is not None:
                    wake_s = min(wake_s, cast(ArrivingForecasts, forecast).next_due_s(now_s))
            return wake_s
        index = int(np.searchsorted(self._wake_instants, now_s + _EPS_S, side="right"))
        return float(self._wake_instants[index]) if index < len(self._wake_instants) else math.inf

    def _site_intent(
        self, site: str, now_s: float, observation: Observation
    ) -> tuple[Intent, float]:
        signal = self.context.signals[site]
        provisioned = observation.site_states.get(site, SiteState.OFF) is not SiteState.OFF
        level = self.level(site, now_s, observation)
        outlook = outlook_of(self.forecasts[site], now_s, signal.resolution_s)
        if signal.value_at(now_s) < level:
            self._above_since.pop(site, None)
            if provisioned or self.worth_starting(site, now_s, level, outlook):
                return Intent.TRAIN, math.inf
            return Intent.OFF, math.inf
        if not provisioned:
            self._above_since.pop(site, None)
        else:
            self._above_since.setdefault(site, now_s)
        # forecasts lean on persistence and rarely foresee a window (re)opening: a released
        # window keeps its nodes for hold_s whatever the forecast says
        holding = provisioned and now_s - self._above_since[site] < self.config.hold_s - _EPS_S
        hold_wake_s = self._above_since[site] + self.config.hold_s if holding else math.inf
        runs = (
            outlook.runs_below(level + self.config.forecast_margin_g_per_kwh)
            if outlook is not None
            else []
        )
        seasonal = self._seasonal_opening(site, now_s, level)
        if seasonal is not None and (not runs or seasonal[0] < runs[0][0]):
            runs = [seasonal]
        if not runs:
            return (Intent.STANDBY, hold_wake_s) if holding else (Intent.OFF, math.inf)
        opens_s, closes_s = runs[0]
        ready_by_s = opens_s - self.startup_s - self.config.lead_s
        bridge_s = max(self.config.bridge_s, self.startup_s + self.config.lead_s)
        if provisioned and (holding or opens_s - now_s <= bridge_s + _EPS_S):
            return Intent.STANDBY, hold_wake_s
        if closes_s - opens_s < self.config.min_window_s:
            return Intent.OFF, math.inf
        if now_s >= ready_by_s - _EPS_S:
            return Intent.STANDBY, math.inf
        return Intent.OFF, ready_by_s  # released (or still off) until it is time to pre-provision

    def _seasonal_opening(
        self, site: str, now_s: float, level: float
    ) -> tuple[float, float] | None:
        """An opening the signal made ``seasonal_s`` ago within the pre-provisioning reach
        (``(opens, closes)`` shifted to today), if the site was not open then already."""
        if self.config.seasonal_s <= 0:
            return None
        signal = self.context.signals[site]
        then_s = now_s - self.config.seasonal_s
        if then_s < signal.start_s or signal.value_at(then_s) < level:
            return None
        reach_s = self.startup_s + self.config.lead_s + signal.resolution_s
        times, values = signal.times_s, signal.ci_g_per_kwh
        first = int(np.searchsorted(times, then_s, side="right"))
        last = int(np.searchsorted(times, then_s + reach_s, side="right"))
        below = np.flatnonzero(values[first:last] < level)
        if not len(below):
            return None
        opened = first + int(below[0])
        known = int(np.searchsorted(times, now_s, side="right"))  # only what has been seen
        above = np.flatnonzero(values[opened:known] >= level)
        closes_s = float(times[opened + above[0]]) + self.config.seasonal_s if len(above) else math.inf
        return float(times[opened]) + self.config.seasonal_s, closes_s


register_policy(ForecastAwarePolicy)
