"""Resolve one run of an experiment into what both executors need: context, policy, power.

``RunPlan`` is built identically for the simulator and the Ray coordinator, so both execute the
same policy object against the same calendar and validated signals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from curtail.config import ExperimentConfig, RunSpec
from curtail.planning.energy import PowerModel
from curtail.planning.forecast import ArrivingForecasts, IssuedForecasts
from curtail.planning.live_calendar import KnownSignals, LiveCalendar
from curtail.planning.policy import Policy, PolicyContext, make_policy
from curtail.planning.signals import Signal, to_epoch_s
from curtail.planning.traces import Forecast, TraceError, TraceSet, load_forecast, load_traces
from curtail.planning.windows import CurtailmentCalendar, warn_short_percentile_history


@dataclass(frozen=True)
class RunPlan:
    run: RunSpec
    context: PolicyContext
    policy: Policy
    power: dict[str, PowerModel]
    regions: dict[str, str]
    signals: dict[str, Signal]

    @property
    def calendar(self) -> CurtailmentCalendar | LiveCalendar:
        return self.context.calendar


def load_experiment_traces(config: ExperimentConfig) -> tuple[TraceSet, dict[str, Forecast]]:
    traces = load_traces(config.traces)
    forecasts = {f.region: load_forecast(f) for f in config.forecasts}
    return traces, forecasts


def plan_run(
    config: ExperimentConfig,
    run: RunSpec,
    traces: TraceSet,
    forecasts: dict[str, Forecast] | None = None,
) -> RunPlan:
    """Validate the run against its traces and build the policy that will drive it."""
    sites = {name: config.sites[name] for name in run.sites}
    regions = {name: site.region for name, site in sites.items()}
    signals = {name: traces.signal(region, needed_by=name) for name, region in regions.items()}
    start_s = to_epoch_s(run.start) if isinstance(run.start, datetime) else max(s.start_s for s in signals.values())
    deadline_s = to_epoch_s(run.deadline) if run.deadline else min(s.end_s for s in signals.values())
    if deadline_s <= start_s:
        raise TraceError(
            next(iter(signals.values())).source,
            f"run {run.name!r} ends before it starts",
            "set deadline after start (and both inside the trace)",
        )
    for name, region in regions.items():
        traces.require_span(region, start_s, deadline_s, needed_by=name)
    warn_short_percentile_history(signals, config.rules_for(run), start_s)
    calendar = CurtailmentCalendar(signals, config.rules_for(run))
    site_forecasts = {
        name: forecasts[region] for name, region in regions.items() if forecasts and region in forecasts
    }
    return _plan(config, run, signals, calendar, start_s, deadline_s, site_forecasts)


def plan_live_run(
    config: ExperimentConfig,
    run: RunSpec,
    calendar: LiveCalendar,
    start_s: float,
    forecasts: Mapping[str, ArrivingForecasts] | None = None,
) -> RunPlan:
    """A live run: the calendar grows with the readings, the policy reads the past through it
    (:class:`KnownSignals`) and the source's ``forecasts`` as they arrive; the deadline is
    ``live.duration_s`` on."""
    if config.live is None:
        raise ValueError("plan_live_run needs an experiment with [live]")
    regions = {name: config.sites[name].region for name in run.sites}
    context_signals = KnownSignals(calendar, regions)
    return _plan(config, run, {}, calendar, start_s, start_s + config.live.duration_s, dict(forecasts or {}),
                 context_signals=context_signals)


def plan_recorded(
    config: ExperimentConfig,
    run: RunSpec,
    signals: dict[str, Signal],
    start_s: float,
    deadline_s: float,
    forecasts: Mapping[str, Forecast] | None = None,
) -> RunPlan:
    """A finished live run's plan on the signal (and forecasts) it recorded, with its deadline
    (``start_s + live.duration_s``): its summary, and its replay."""
    calendar = CurtailmentCalendar(signals, config.rules_for(run))
    return _plan(config, run, signals, calendar, start_s, deadline_s, dict(forecasts or {}))


def _plan(
    config: ExperimentConfig,
    run: RunSpec,
    signals: dict[str, Signal],
    calendar: CurtailmentCalendar | LiveCalendar,
    start_s: float,
    deadline_s: float,
    forecasts: Mapping[str, IssuedForecasts],
    *,
    context_signals: Mapping[str, Signal] | None = None,
) -> RunPlan:
    sites = {name: config.sites[name] for name in run.sites}
    context = PolicyContext(
        sites=sites,
        signals=signals if context_signals is None else context_signals,
        calendar=calendar,
        rules=config.rules_for(run),
        execution=config.execution_for(run),
        start_s=start_s,
        deadline_s=deadline_s,
        token_budget=config.token_budget_for(run),
        forecasts=forecasts,
    )
    policy = make_policy(run.policy, context)
    power = {name: PowerModel.of_site(site) for name, site in sites.items()}
    return RunPlan(run, context, policy, power, {name: site.region for name, site in sites.items()}, signals)
