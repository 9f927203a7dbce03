"""The budget/deadline-aware policy: spend the token budget in the cleanest windows.

Curtailment windows are not equally clean. On the paper trace California's windows sit at
43–99 gCO2/kWh and come first, while South Australia's and Texas's later windows sit near
0–20: the threshold policy trains through the first ones it meets. This policy trains a site
only while its *expected carbon per token* is below a price, and the price is the explicit knob
that trades completion time for emissions:

* ``max_ci_g_per_kwh`` — the dirtiest intensity it trains at while it is on schedule, for the
  most efficient site (tokens per joule). Less efficient sites must be proportionally cleaner,
  and a start is charged its overhead: idle power through provisioning and group start,
  amortised over the training the forecast says the window will give (carbon per token =
  ``(P_train·ci·W + P_idle·startup·ci) / (tokens_per_s·W)``). Lower = cleaner and later.
* ``pace_fraction`` — a schedule to keep: while fewer than ``pace_fraction`` × the
  time-proportional share of the budget is trained, the price rises to the calendar threshold
  (any curtailment window). 0 turns pacing off.
* ``deadline_guard`` — when what is left can only just be trained by every site running from
  now to the deadline (within ``guard_margin``), every site trains whatever the grid: the
  budget is met rather than missed. A budget no schedule can meet any more is not chased.

Everything else — pre-provisioning from honest forecasts, skipping short windows, bridging
gaps — is the forecast-aware policy's (:mod:`curtail.planning.forecast_policy`), applied at
the price instead of the curtailment threshold. The policy sees the present and forecasts,
never the future: the perfect-foresight bound is :mod:`curtail.planning.oracle`.
"""

from __future__ import annotations

import math
from typing import Any

from curtail.planning.forecast import Outlook
from curtail.planning.forecast_policy import ForecastAwarePolicy
from curtail.planning.policy import Decision, Observation, PolicyContext, register_policy


class BudgetPolicy(ForecastAwarePolicy):
    """Train where carbon per token is below a price; keep pace; never miss a makeable deadline.

    Args:
        max_ci_g_per_kwh: the price, as an intensity at the most efficient site (see module doc).
        pace_fraction: 0..1, share of a linear schedule to keep before relaxing the price.
        deadline_guard: run every site when the budget can only just be met.
        guard_margin: how close to "only just" (share of the remaining full-speed capacity).
        **forecast_params: those of :class:`~curtail.planning.forecast_policy.ForecastAwarePolicy`.
    """

    kind = "budget"

    def __init__(
        self,
        context: PolicyContext,
        *,
        max_ci_g_per_kwh: float = 60.0,
        pace_fraction: float = 0.0,
        deadline_guard: bool = True,
        guard_margin: float = 0.1,
        **forecast_params: Any,
    ):
        # idling after a price crossing only burns idle power: no hold unless asked for
        forecast_params.setdefault("hold_s", 0.0)
        super().__init__(context, **forecast_params)
        self.max_ci_g_per_kwh = max_ci_g_per_kwh
        self.pace_fraction = pace_fraction
        self.deadline_guard = deadline_guard
        self.guard_margin = guard_margin
        joules_per_token = {
            site: cfg.site_training_power_w / cfg.tokens_per_s
            for site, cfg in context.sites.items()
        }
        best = min(joules_per_token.values())
        # a site needing twice the energy per token must be twice as clean
        self.price_g_per_kwh = {
            site: max_ci_g_per_kwh * best / j for site, j in joules_per_token.items()
        }
        self.total_tokens_per_s = sum(cfg.tokens_per_s for cfg in context.sites.values())
        self._guard_engaged = False

    # ------------------------------------------------------------------ schedule state

    def must_run(self, now_s: float, observation: Observation) -> bool:
        """Only every site, from now on, can still meet the budget by the deadline.

        Once it holds it stays (latched): the sites it started must not stop for their own
        start-up time, which the capacity estimate charges every site.
        """
        if not self.deadline_guard:
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
            and remaining >= (1.0 - self.guard_margin) * capacity - slack
        )
        self._guard_engaged = engaged
        return engaged

    def guard_starts_s(self, observation: Observation) -> float:
        """When :meth:`must_run` starts to hold if nothing more is trained (``inf``: never)."""
        remaining = observation.tokens_remaining
        if not self.deadline_guard or remaining <= 0:
            return math.inf
        full_speed_s = remaining / ((1.0 - self.guard_margin) * self.total_tokens_per_s)
        return self.context.deadline_s - self.startup_s - full_speed_s

    def decide(self, now_s: float, observation: Observation) -> Decision:
        decision = super().decide(now_s, observation)
        guard_s = self.guard_starts_s(observation)
        if now_s + 1e-6 < guard_s < decision.next_decision_s:
            return Decision(decision.intents, guard_s)
        return decision

    def behind(self, now_s: float, observation: Observation) -> bool:
        if self.pace_fraction <= 0:
            return False
        span_s = self.context.deadline_s - self.context.start_s
        elapsed = min(max((now_s - self.context.start_s) / span_s, 0.0), 1.0)
        return observation.tokens_trained < self.pace_fraction * elapsed * observation.token_budget

    # ------------------------------------------------------------------ ForecastAwarePolicy hooks

    def level(self, site: str, now_s: float, observation: Observation) -> float:
        if self.must_run(now_s, observation):
            return math.inf
        threshold = self.context.calendar.threshold_at(site, now_s)
        if self.behind(now_s, observation):
            return threshold
        return min(threshold, self.price_g_per_kwh[site])

    def worth_starting(
        self, site: str, now_s: float, level: float, outlook: Outlook | None
    ) -> bool:
        if not super().worth_starting(site, now_s, level, outlook):
            return False
        if math.isinf(level) or outlook is None or self.startup_s <= 0:
            return True
        training_s = self.predicted_training_s(site, now_s, level, outlook)
        if math.isinf(training_s):
            training_s = outlook.horizon_end_s - now_s - self.startup_s
        if training_s <= 0:
            return False
        cfg = self.context.sites[site]
        overhead = cfg.site_idle_power_w * self.startup_s / (cfg.site_training_power_w * training_s)
        return self.context.signals[site].value_at(now_s) * (1.0 + overhead) < level


register_policy(BudgetPolicy)
