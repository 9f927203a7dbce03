"""Model-predictive control: re-plan the token budget over ``[now, deadline]`` at every decision,
act on the present, re-plan.

At every decision the policy estimates every site's carbon intensity from now to the deadline
from what it may know at ``now`` (never the future itself: that is the oracle,
:mod:`curtail.planning.oracle`):

* **now**: the observed sample, until the next sample or the first forecast target;
* **within the forecast horizon**: the newest forecast issued by now
  (:func:`~curtail.planning.forecast.outlook_of`: recorded WattTime forecasts, or synthetic ones
  from the calibrated error model); a target is curtailed when below the threshold in force now;
* **beyond the horizon, climatology**: each of the last ``climatology_days`` whole days is a
  *scenario* of every later day: its samples at the same time of day, curtailed or not as they
  were then. Scenarios, not a mean profile: a slot curtailed at 0 g on three days of seven and
  at 400 g on the others is a 0 g window on three days in seven, where its mean (229 g) would
  say it is never curtailed. The plan counts on the scenarios' mean supply less
  ``climatology_sigmas`` standard deviations of a sum of independent days: over one day that is
  close to the worst recent day, over months close to the mean (a plan that expects every day
  to be the worst would train every window of a year; one that expects the mean of seven days
  for the next 18 hours skips windows the day does not make up);
* **no whole day of past** (a trace that starts with the run, like the 18-hour paper trace,
  until a day has passed): no windows beyond the horizon. The brief's alternative, holding the
  current (or the forecast's last) value to the deadline, stakes the budget on one sample: a
  0 g window seen for five minutes is expected to last all night and every other window is
  skipped for it; the run's few hours of past as a distribution promise windows every evening
  that a daily cycle does not deliver. Both leave the deadline guard to finish the budget on
  fossil power. On twelve three-site 18-hour cuts of the CAISO month without past (budget: 75 %
  of what their windows hold), holding the forecast's last value emitted more than the
  threshold policy on 6 of 12 with perfect forecasts (14.9 kg in all, threshold 13.9; better
  without forecasts: 9.6 kg), the few hours as a distribution on 10 of 12; counting nothing
  there: 9.8 kg with none, synthetic or perfect forecasts, never above threshold (oracle run
  9.5). Counting no supply where nothing is known makes the plan need every window it can see:
  the policy trains in the windows it meets, like the threshold rule but never outside them,
  until forecasts or a day of past show enough supply to be choosy.

The **plan** is the oracle's windows-only choice (:func:`~curtail.planning.oracle.cheapest_pieces`
with ``windows_only``) on these estimates: every site's estimated curtailed pieces in carbon per
token, cheapest first, until they hold the tokens left plus one start-up of every site (the plan
knows no overheads, and start-ups near the deadline can no longer be made up later). Its
marginal carbon per token is the **price** (``inf``: the estimated windows cannot hold the
tokens, so every window is trained). The policy then acts as the budget policy
(:class:`~curtail.planning.budget.BudgetPolicy`, whose price it replaces): a site trains while it
is curtailed and its carbon per token is at or below the price; ``pace_fraction`` and the
deadline guard keep the budget. Forecasts pre-provision and bridge gaps at the price only where
idling costs less than starting inside the window and buying the lost start-up at the price (the
oracle run's rule); while the price is ``inf`` a lost token's worth is unknown and the policy does
not idle for it: better forecasts buy idling only where the plan can price it.

With perfect forecasts reaching the deadline the estimate is the truth, the plan is the oracle's
and the run approaches the oracle run; without forecasts it is a history rule (the climatology's
price at the budget's marginal token; without a past, every window).

The supply curve depends on ``now`` only (not on the tokens left): it is built once per decision
instant and the price is a search on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from curtail.config import MpcPolicyConfig
from curtail.planning.budget import BudgetPolicy
from curtail.planning.forecast import Outlook as ForecastOutlook
from curtail.planning.forecast import outlook_of
from curtail.planning.forecast_policy import ForecastAwarePolicy
from curtail.planning.live_calendar import LiveCalendar
from curtail.planning.policy import (
    Decision,
    Intent,
    Observation,
    PolicyContext,
    register_policy,
)

_DAY_S = 86400.0
_WS_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Outlook:
    """A site's pieces from now to the end of its forecast horizon: intensity, curtailed (below
    the threshold in force now) and seconds inside ``[now, deadline]``."""

    ci_g_per_kwh: np.ndarray
    curtailed: np.ndarray
    seconds: np.ndarray
    horizon_end_s: float


@dataclass(frozen=True)
class Climatology:
    """A site's curtailed samples of the last ``climatology_days`` days: intensity, which past
    day each belongs to (1 = the last 24 h), and the seconds beyond the horizon, up to the
    deadline, at its time of day."""

    ci_g_per_kwh: np.ndarray
    day: np.ndarray
    future_s: np.ndarray


@dataclass(frozen=True)
class SupplyCurve:
    """The windows-only supply from now to the deadline a plan counts on, cheapest first: each
    piece's intensity at the most efficient site (``reference_ci_g_per_kwh``, ascending) and the
    tokens the pieces up to it hold (``cumulative_tokens``, non-decreasing)."""

    reference_ci_g_per_kwh: np.ndarray
    cumulative_tokens: np.ndarray

    @property
    def tokens(self) -> float:
        return float(self.cumulative_tokens[-1]) if len(self.cumulative_tokens) else 0.0

    def price_for(self, tokens: float) -> float:
        """The reference intensity (gCO2/kWh) of the piece that completes ``tokens`` (``inf`` if
        the supply cannot hold them; 0 for no tokens)."""
        if tokens <= 0:
            return 0.0
        index = int(np.searchsorted(self.cumulative_tokens, tokens * (1 - 1e-12), side="left"))
        if index >= len(self.cumulative_tokens):
            return math.inf
        return float(self.reference_ci_g_per_kwh[index])


class MpcPolicy(BudgetPolicy):
    """Re-plan the windows-only cheapest pieces for the tokens left over forecast and
    climatology at every decision; train where carbon per token is at or below the plan's
    marginal price.

    Configured by :class:`~curtail.config.MpcPolicyConfig`: ``climatology_days``,
    ``climatology_sigmas``, the budget policy's guards and every forecast-aware parameter.

    >>> policy = make_policy(MpcPolicyConfig(forecast_horizon_s=3900), context)
    >>> policy.supply(now_s).price_for(1e9)  # gCO2/kWh at the most efficient site
    """

    kind = "mpc"
    config: MpcPolicyConfig  # type: ignore[assignment]  # the budget policy's guards, its own price

    def __init__(self, context: PolicyContext, config: MpcPolicyConfig | None = None):
        if isinstance(context.calendar, LiveCalendar):
            raise TypeError(
                "the mpc policy reads each site's past as a trace (climatology) and does not run live "
                "yet; use kind = 'budget' for a live run"
            )
        super().__init__(context, config)  # type: ignore[arg-type]
        self._curtailed = {
            site: context.signals[site].ci_g_per_kwh < context.calendar.thresholds(site) for site in context.sites
        }
        self._supply_at: tuple[float, SupplyCurve] | None = None
        self._price_cache: tuple[float, float, float] | None = None

    # ------------------------------------------------------------------ the price

    def planned_tokens(self, observation: Observation) -> float:
        """The tokens left and a start-up of every site (0 when none are left)."""
        remaining = observation.tokens_remaining
        return remaining + self.startup_s * self.total_tokens_per_s if remaining > 0 else 0.0

    def price_g_per_kwh(self, now_s: float, observation: Observation) -> float:
        """The plan's marginal intensity at the most efficient site (``inf``: every window)."""
        need = self.planned_tokens(observation)
        if self._price_cache is not None and self._price_cache[:2] == (now_s, need):
            return self._price_cache[2]
        price = self.supply(now_s).price_for(need)
        self._price_cache = (now_s, need, price)
        return price

    def level(self, site: str, now_s: float, observation: Observation) -> float:
        # at or below the price: the marginal piece is in the plan (a 0 g window at a 0 g price)
        level = super().level(site, now_s, observation)
        return float(np.nextafter(level * (1 + 1e-9), math.inf)) if math.isfinite(level) else level

    def supply(self, now_s: float) -> SupplyCurve:
        """The windows-only supply over ``[now_s, deadline]`` the plan counts on, cheapest first
        (cached per instant): the horizon's, and beyond it the climatology's mean over the
        past-day scenarios less ``climatology_sigmas`` standard deviations of a sum of
        independent days."""
        if self._supply_at is not None and self._supply_at[0] == now_s:
            return self._supply_at[1]
        references, tokens, groups = [], [], []
        for site, cfg in self.context.sites.items():
            outlook, climatology = self.estimate(site, now_s)
            to_reference = 1.0 / self._to_site_ci[site]
            references += [
                outlook.ci_g_per_kwh[outlook.curtailed] * to_reference,
                climatology.ci_g_per_kwh * to_reference,
            ]
            tokens += [
                cfg.tokens_per_s * outlook.seconds[outlook.curtailed],
                cfg.tokens_per_s * climatology.future_s,
            ]
            groups += [np.zeros(int(outlook.curtailed.sum()), dtype=int), climatology.day]
        reference, token, group = (np.concatenate(c) for c in (references, tokens, groups))
        order = np.argsort(reference, kind="stable")
        reference, token, group = reference[order], token[order], group[order]
        days = self._past_days(now_s)
        # tokens below each price: the horizon's (row 0) and each scenario's (row k = past day k)
        by_group = np.zeros((max(days, default=0) + 1, len(token)))
        known = group < len(by_group)  # days a site's trace holds only in part are no scenario
        by_group[group[known], np.flatnonzero(known)] = token[known]
        cumulative = np.cumsum(by_group, axis=1)
        supply = cumulative[0]
        if days:
            scenarios = cumulative[days]
            future_days = max((self.context.deadline_s - now_s) / _DAY_S, 1.0)
            spread = self.config.climatology_sigmas * scenarios.std(axis=0) / math.sqrt(future_days)
            # less spread may not make a higher price look scarcer: the supply stays non-decreasing
            supply = np.maximum.accumulate(supply + np.maximum(scenarios.mean(axis=0) - spread, 0.0))
        curve = SupplyCurve(reference, supply)
        self._supply_at = (now_s, curve)
        return curve

    def _past_days(self, now_s: float) -> list[int]:
        """The scenarios: the past days 1 .. ``climatology_days`` (day 1: the last 24 h) that every
        site's trace holds whole."""
        latest_start_s = max(signal.start_s for signal in self.context.signals.values())
        days = range(1, self.config.climatology_days + 1)
        return [day for day in days if now_s - day * _DAY_S >= latest_start_s - 1e-6]

    def worth_starting(
        self, site: str, now_s: float, level: float, outlook: ForecastOutlook | None
    ) -> bool:
        """A window in the plan is started, as the oracle run starts its pieces: the plan holds
        a start-up of every site, and charging it again would keep a window priced at the
        margin from ever starting (``min_window_s`` still skips short windows)."""
        return ForecastAwarePolicy.worth_starting(self, site, now_s, level, outlook)

    # ------------------------------------------------------------------ idling has a price too

    def decide(self, now_s: float, observation: Observation) -> Decision:
        """The budget policy's decision, with every ``STANDBY`` (pre-provisioning ahead of a
        forecast opening, bridging a forecast gap) kept only where it pays (:meth:`standby_pays`)."""
        decision = super().decide(now_s, observation)
        intents = dict(decision.intents)
        for site, intent in decision.intents.items():
            if intent is Intent.STANDBY and not self.standby_pays(site, now_s, observation):
                intents[site] = Intent.OFF
        return Decision(intents, decision.next_decision_s)

    def standby_pays(self, site: str, now_s: float, observation: Observation) -> bool:
        """Idling from now until the forecast opening (at the forecast's intensity) emits no
        more than provisioning inside the window and buying the start-up's lost tokens at the
        price (the oracle run's rule). Never while the price is ``inf`` (a lost token's worth is
        unknown); always when no forecast shows the opening (a ``hold_s`` or seasonal stand-by)."""
        price = self.price_g_per_kwh(now_s, observation)
        if not math.isfinite(price):
            return False
        signal = self.context.signals[site]
        forecast = outlook_of(self.forecasts[site], now_s, signal.resolution_s)
        if forecast is None or not len(forecast.targets_s):
            return True
        level = self.level(site, now_s, observation)
        runs = forecast.runs_below(level + self.config.forecast_margin_g_per_kwh)
        if not runs or runs[0][0] <= now_s:
            return True
        opens_s, closes_s = runs[0]
        cfg = self.context.sites[site]
        starts = np.concatenate(([now_s], forecast.targets_s))
        values = np.concatenate(([signal.value_at(now_s)], forecast.ci_g_per_kwh))
        inside_s = min(self.startup_s, closes_s - opens_s)
        idle_kw = cfg.site_idle_power_w / _WS_PER_KWH
        idle_g = idle_kw * _integral(starts, values, now_s, opens_s)
        restart_idle_g = idle_kw * _integral(starts, values, opens_s, opens_s + inside_s)
        g_per_token = level * cfg.site_training_power_w / (_WS_PER_KWH * cfg.tokens_per_s)
        return idle_g <= restart_idle_g + cfg.tokens_per_s * inside_s * g_per_token

    # ------------------------------------------------------------------ the estimate

    def estimate(self, site: str, now_s: float) -> tuple[Outlook, Climatology]:
        """``site`` as the policy may know it at ``now_s``: the observed value and the forecast
        up to the horizon, and the past days whose times of day fill the rest of
        ``[now_s, deadline]``."""
        deadline_s = self.context.deadline_s
        signal = self.context.signals[site]
        threshold = self.context.calendar.threshold_at(site, now_s)
        index = max(int(np.searchsorted(signal.times_s, now_s, side="right")) - 1, 0)
        current = float(signal.ci_g_per_kwh[index])
        forecast = outlook_of(self.forecasts[site], now_s, signal.resolution_s)
        if forecast is not None and len(forecast.targets_s):
            starts = np.concatenate(([now_s], forecast.targets_s))
            ends = np.append(forecast.targets_s, forecast.horizon_end_s)
            values = np.concatenate(([current], forecast.ci_g_per_kwh))
        else:
            next_s = float(signal.times_s[index + 1]) if index + 1 < len(signal.times_s) else signal.end_s
            starts, ends, values = np.array([now_s]), np.array([next_s]), np.array([current])
        seconds = np.maximum(np.minimum(ends, deadline_s) - np.minimum(starts, deadline_s), 0.0)
        horizon_end_s = float(ends[-1])
        outlook = Outlook(values, values < threshold, seconds, horizon_end_s)
        return outlook, self._climatology(site, now_s, index, horizon_end_s)

    def _climatology(self, site: str, now_s: float, index: int, begin_s: float) -> Climatology:
        """The curtailed samples of the last ``climatology_days`` days before ``now_s`` (``index``:
        the sample holding now), each with the seconds of ``[begin_s, deadline)`` at its time of
        day (the others add no supply)."""
        signal = self.context.signals[site]
        end_s = self.context.deadline_s
        window_s = max(now_s - self.config.climatology_days * _DAY_S, signal.start_s)
        first = max(int(np.searchsorted(signal.times_s, window_s, side="right")) - 1, 0)
        times = signal.times_s
        starts = np.maximum(times[first : index + 1], window_s)
        ends = np.minimum(np.append(times[first + 1 : index + 1], now_s), now_s)  # the last: until now
        keep = (ends > starts) & self._curtailed[site][first : index + 1]
        starts, lengths = starts[keep], (ends - starts)[keep]
        day = np.floor((now_s - (starts + lengths / 2)) / _DAY_S).astype(int) + 1
        future_s = _time_of_day_seconds(starts, lengths, begin_s, end_s) if end_s > begin_s else 0.0 * starts
        return Climatology(signal.ci_g_per_kwh[first : index + 1][keep], day, future_s)


def _integral(starts_s: np.ndarray, values: np.ndarray, begin_s: float, end_s: float) -> float:
    """∫ of the step function ``values`` (each from its start to the next; the last holds on)
    over ``[begin_s, end_s)``, in value·seconds."""
    if end_s <= begin_s:
        return 0.0
    edges = np.append(starts_s[1:], math.inf)
    overlap = np.minimum(edges, end_s) - np.maximum(starts_s, begin_s)
    return float(np.sum(values * np.maximum(overlap, 0.0)))


def _time_of_day_seconds(
    starts_s: np.ndarray, lengths_s: np.ndarray, begin_s: float, end_s: float
) -> np.ndarray:
    """Seconds of ``[begin_s, end_s)`` whose time of day falls in ``[start, start + length)``
    (each length at most a day), vectorised."""

    def below(x: float) -> np.ndarray:  # seconds of the daily copies before x, up to a constant
        days, into_day_s = np.divmod(x - starts_s, _DAY_S)
        return days * lengths_s + np.minimum(into_day_s, lengths_s)

    return np.maximum(below(end_s) - below(begin_s), 0.0)


register_policy(MpcPolicy)
