"""Shadow mode: follow a live signal with the run's policy and state machine, without training.

Before committing GPUs an operator watches what a live run would do: ``curtail shadow CONFIG``
reads the ``[live]`` source on the real-time clock (``training.realtime_speedup``), applies the
curtailment rules as readings arrive and executes the policy's intents in the simulator's state
machine (provisioning, worker-group start, rounds), sleeping between events. Every
``interval_s`` of the signal's clock, and whenever something changes, it reports per site: the
current intensity and threshold, the window state (off / provisioning / ready / draining), what
the site would be doing, what the policy wants, and when the calendar may change next.

Readings go to ``live_readings.jsonl`` in the shadow's directory, as in a live run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curtail.config import ExperimentConfig, RunSpec
from curtail.planning.executor import RoundView
from curtail.planning.plan import plan_live_run
from curtail.planning.signals import iso
from curtail.planning.simulator import Simulator
from curtail.sources.live_feed import LiveSignal, SignalEventSink


@dataclass(frozen=True)
class SiteStatus:
    site: str
    ci_g_per_kwh: float
    threshold_g_per_kwh: float
    window: str  # off / provisioning / ready / draining
    state: str  # what the site would be doing: off / provisioning / starting / waiting / training / syncing
    intent: str  # what the policy wants: off / standby / train


@dataclass(frozen=True)
class ShadowStatus:
    t_s: float
    mode: str  # idle / single / federated
    sites: tuple[SiteStatus, ...]
    next_change_s: float  # when the calendar may change next (a reading due, a timer)

    def lines(self) -> list[str]:
        head = f"{iso(self.t_s)}  mode {self.mode:<9}  next change {iso(self.next_change_s)}"
        rows = [
            f"  {s.site:<16} {s.ci_g_per_kwh:8.1f} g/kWh (threshold {s.threshold_g_per_kwh:g})  "
            f"window {s.window:<12} site {s.state:<12} policy {s.intent}"
            for s in self.sites
        ]
        return [head, *rows]


class _ShadowExecutor(Simulator):
    """The simulator's state machine on the wall clock: it sleeps where a run would train."""

    def __init__(self, *args: Any, speedup: float, interval_s: float,
                 on_status: Callable[[ShadowStatus], None], stop_after: int | None):
        super().__init__(*args)
        self.speedup = speedup
        self.max_segment_s = interval_s
        self.on_status = on_status
        self.stop_after = stop_after
        self.statuses: list[ShadowStatus] = []
        self.wall_start = time.time()

    def _sleep_until(self, t_s: float) -> None:
        time.sleep(max(0.0, self.wall_start + (t_s - self.context.start_s) / self.speedup - time.time()))

    def work(self, sites: list[str], start_s: float, end_s: float, current: RoundView | None) -> dict[str, float]:
        self._sleep_until(end_s)
        return super().work(sites, start_s, end_s, current)

    def pass_time(self, start_s: float, end_s: float) -> None:
        self._sleep_until(end_s)

    def at_safe_point(self, t_s: float, next_decision_s: float, current: RoundView | None) -> bool:
        calendar = self.context.calendar
        sites = []
        for name, site in self.sites.items():
            sites.append(SiteStatus(
                name, calendar.value_at(name, t_s), calendar.threshold_at(name, t_s),
                calendar.state_at(name, t_s).value, self._state(site).value, site.intent.value,
            ))
        status = ShadowStatus(t_s, self.recorder.mode.value, tuple(sites), calendar.next_change_after(t_s))
        if not self.statuses or status.sites != self.statuses[-1].sites or status.mode != self.statuses[-1].mode \
                or t_s - self.statuses[-1].t_s >= self.max_segment_s - 1e-6:
            self.statuses.append(status)
            self.on_status(status)
        return self.stop_after is not None and len(self.statuses) >= self.stop_after


def shadow(
    experiment: ExperimentConfig,
    run: RunSpec,
    shadow_dir: Path,
    *,
    interval_s: float = 300.0,
    stop_after: int | None = None,
    on_status: Callable[[ShadowStatus], None] = lambda status: print("\n".join(status.lines()), flush=True),
    on_event: SignalEventSink = lambda t_s, site, event, details: print(f"{iso(t_s)}  {site}: {event} {details}",
                                                                       flush=True),
) -> list[ShadowStatus]:
    """Follow ``run``'s live signal without training (see the module doc) until its deadline, or
    ``stop_after`` reports; returns the reports. Signal events (``signal_failed``, ...) go to
    ``on_event`` as they happen; both are printed by default."""
    if experiment.live is None:
        raise ValueError(f"experiment {experiment.name!r} has no [live] source to follow")
    live = LiveSignal(experiment, run, shadow_dir, on_event=on_event)
    plan = plan_live_run(experiment, run, live.calendar, live.planned_start_s(), live.site_forecasts())
    executor = _ShadowExecutor(plan.context, plan.policy, speedup=experiment.training.realtime_speedup,
                               interval_s=interval_s, on_status=on_status, stop_after=stop_after)
    try:
        live.begin(plan.context.start_s)
        executor.wall_start = time.time()
        executor.run()
    finally:
        live.close()
    return executor.statuses
