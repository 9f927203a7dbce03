"""The budget/deadline-aware policy: spend the token budget in the cleanest windows.

Curtailment windows are not equally clean. On the paper trace California's windows sit at
43–99 gCO2/kWh and come first, while South Australia's and Texas's later windows sit near
0–20: the threshold policy trains through the first ones it meets. This policy trains a site
only while its *carbon per token* is below a **price**, the explicit knob that trades
completion time for emissions, and it prices carbon per token, not per kWh: a site that needs
twice the energy per token must be twice as clean, and a start is charged its overhead (idle
power through provisioning and group start, amortised over the training the start is expected
to buy).

The price is the larger of

* ``max_ci_g_per_kwh`` — a fixed price, as an intensity at the most efficient site (tokens per
  joule). Lower = cleaner and later. It is all the policy has where the trace has no past
  (the 18-hour paper trace starts at its first sample);
* the **supply price** (``supply_margin > 0``) — the lowest intensity at which the time the
  sites spent below it over the past ``history_s`` (or the last ``recent_s``, whichever saw
  less), projected to the deadline, would train ``supply_margin`` times the tokens left. It
  rises as the budget gets tight or the grid dries up and falls when clean windows abound, so
  the same knobs carry over to another period. It waits until ``history_s`` of past exists.

Two guards keep the budget: ``pace_fraction`` (while fewer than that share of a linear
schedule is trained, any curtailment window will do) and ``deadline_guard`` (when what is left
can only just be trained by every site running until the deadline, within ``guard_margin``,
every site trains whatever the grid: the budget is met rather than missed; a budget no
schedule can meet any more is not chased).

Everything else — pre-provisioning from honest forecasts, skipping short windows, bridging
gaps — is the forecast-aware policy's (:mod:`curtail.planning.forecast_policy`), applied at
the price instead of the curtailment threshold. The policy sees the past, the present and
forecasts, never the future: the perfect-foresight bound is :mod:`curtail.planning.oracle`.
"""

from __future__ import annotations

import math

import numpy as np

from curtail.config import BudgetPolicyConfig
from curtail.planning.forecast import Outlook
from curtail.planning.forecast_policy import ForecastAwarePolicy
from curtail.planning.policy import Decision, Observation, PolicyContext, register_policy


class BudgetPolicy(ForecastAwarePolicy):
    """Train where carbon per token is below a price; keep pace; never miss a makeable deadline.

    Configured by :class:`~curtail.config.BudgetPolicyConfig`: the price
    (``max_ci_g_per_kwh``, ``supply_margin``, ``recent_s``), the guards (``pace_fraction``,
    ``deadline_guard``, ``guard_margin``) and every forecast-aware parameter (``hold_s``
    defaults to 0 here: idling after a price crossing only burns idle power).
    """

    kind = "budget"
    config: BudgetPolicyConfig

    def __init__(self, context: PolicyContext, config: BudgetPolicyConfig | None = None):
        super().__init__(context, config)
        joules_per_token = {
            site: cfg.site_training_power_w / cfg.tokens_per_s
            for site, cfg in context.sites.items()
        }
        best = min(joules_per_token.values())
        # a site needing twice the energy per token must be twice as clean
        self._to_site_ci = {site: best / j for site, j in joules_per_token.items()}
        self.total_tokens_per_s = sum(cfg.tokens_per_s for cfg in context.sites.values())
        self._guard_engaged = False
        self._price_at: tuple[float, float] | None = None  # (now_s, reference price) cache

    # ------------------------------------------------------------------ the price

    def price_g_per_kwh(self, now_s: float, observation: Observation) -> float:
        """The price now, as an intensity at the most efficient site."""
        if self._price_at is not None and self._price_at[0] == now_s:
            return self._price_at[1]
        price = self.config.max_ci_g_per_kwh
        if self.config.supply_margin > 0:
            price = max(price, self.supply_price(now_s, observation.tokens_remaining))
        self._price_at = (now_s, price)
        return price

    def supply_price(self, now_s: float, tokens_left: float) -> float:
        """The lowest reference intensity whose past supply covers ``supply_margin`` × the
        tokens left (``inf`` if even every window would not; 0 without enough past)."""
        horizon_s = max(self.context.deadline_s - now_s, 0.0)
        levels, weights = [], []
        for site, cfg in self.context.sites.items():
            signal = self.context.signals[site]
            if now_s - self.config.history_s < signal.start_s:
                return 0.0
            shares = [self._past_share(site, now_s, self.config.history_s)]
            if self.config.recent_s > 0:
                shares.append(self._past_share(site, now_s, self.config.recent_s))
            levels.append(shares)
            weights.append(cfg.tokens_per_s * horizon_s)
        candidates = np.unique(np.concatenate([v for shares in levels for v, _ in shares]))
        supply = np.zeros(len(candidates))
        for shares, weight in zip(levels, weights):
            # the share of the past below each candidate (strictly), the leaner past counting
            below = [
                np.searchsorted(values, candidates, side="left") / count for values, count in shares
            ]
            supply += weight * np.minimum.reduce(below)
        need = self.config.supply_margin * tokens_left
        enough = np.flatnonzero(supply >= need)
        if not len(enough):
            return math.inf
        # a price just above the candidate that is not yet enough below it
        index = int(enough[0])
        return float(np.nextafter(candidates[index - 1], np.inf)) if index > 0 else 0.0

    def _past_share(self, site: str, now_s: float, span_s: float) -> tuple[np.ndarray, int]:
        """Sorted reference intensities of the curtailed samples in ``[now - span, now)``, and
        how many samples there were (uncurtailed ones count as never below any price)."""
        signal = self.context.signals[site]
        first = int(np.searchsorted(signal.times_s, now_s - span_s, side="left"))
        last = int(np.searchsorted(signal.times_s, now_s, side="left"))
        values = signal.ci_g_per_kwh[first:last]
        curtailed = values < self.context.calendar.thresholds(site)[first:last]
        reference = values[curtailed] / self._to_site_ci[site]
        return np.sort(reference), max(last - first, 1)

    # ------------------------------------------------------------------ schedule state

    def must_run(self, now_s: float, observation: Observation) -> bool:
        """Only every site, from now on, can still meet the budget by the deadline.

        Once it holds it stays (latched): the sites it started must not stop for their own
        start-up time, which the capacity estimate charges every site.
        """
        if not self.config.deadline_guard:
            return False
        if self._guard_engaged:
            return True
        capacity = self.total_tokens_per_s * max(
            0.0, self.context.deadline_s - now_s - self.startup_s
        )
        remaining = observation.tokens_remaining
        slack = 1e-9 * observation.token_budget  # the wake-up instant is computed for equality
        engaged = (
            0.0 < remaining <= capacity + slack
            and remaining >= (1.0 - self.config.guard_margin) * capacity - slack
        )
        self._guard_engaged = engaged
        return engaged

    def guard_starts_s(self, observation: Observation) -> float:
        """When :meth:`must_run` starts to hold if nothing more is trained (``inf``: never)."""
        remaining = observation.tokens_remaining
        if not self.config.deadline_guard or remaining <= 0:
            return math.inf
        full_speed_s = remaining / ((1.0 - self.config.guard_margin) * self.total_tokens_per_s)
        return self.context.deadline_s - self.startup_s - full_speed_s

    def behind(self, now_s: float, observation: Observation) -> bool:
        """Fewer tokens than ``pace_fraction`` of a linear schedule (off at 0)."""
        if self.config.pace_fraction <= 0:
            return False
        span_s = self.context.deadline_s - self.context.start_s
        elapsed = min(max((now_s - self.context.start_s) / span_s, 0.0), 1.0)
        return observation.tokens_trained < self.config.pace_fraction * elapsed * observation.token_budget

    # ------------------------------------------------------------------ ForecastAwarePolicy hooks

    def decide(self, now_s: float, observation: Observation) -> Decision:
        decision = super().decide(now_s, observation)
        guard_s = self.guard_starts_s(observation)
        if now_s + 1e-6 < guard_s < decision.next_decision_s:
            return Decision(decision.intents, guard_s)
        return decision

    def level(self, site: str, now_s: float, observation: Observation) -> float:
        if self.must_run(now_s, observation):
            return math.inf
        threshold = self.context.calendar.threshold_at(site, now_s)
        if self.behind(now_s, observation):
            return threshold
        return min(threshold, self.price_g_per_kwh(now_s, observation) * self._to_site_ci[site])

    def worth_starting(
        self, site: str, now_s: float, level: float, outlook: Outlook | None
    ) -> bool:
        """Below the price even with the start-up's idle energy charged to the expected
        training (:meth:`predicted_training_s`: the forecast and the past's windows).

        When the price has reached the curtailment threshold the budget is short of clean
        supply: every window counts, short ones included.
        """
        if level >= self.context.calendar.threshold_at(site, now_s) or self.startup_s <= 0:
            return True
        if not super().worth_starting(site, now_s, level, outlook):
            return False
        training_s = self.predicted_training_s(site, now_s, level, outlook)
        if math.isinf(training_s):
            return True
        if training_s <= 0:
            return False
        cfg = self.context.sites[site]
        overhead = cfg.site_idle_power_w * self.startup_s / (cfg.site_training_power_w * training_s)
        return self.context.signals[site].value_at(now_s) * (1.0 + overhead) < level


register_policy(BudgetPolicy)
