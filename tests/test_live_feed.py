"""The live chain without Ray: the paper trace served as the WattTime API, polled by the real
client through the poller and the feed, into the live calendar, followed by the threshold policy
in the simulator — it decides what the offline run on the trace decides, its record replays those
decisions exactly, and the feed's handling of a source ahead of the run and of a lost signal."""

from __future__ import annotations

import math

import pytest
from planning_fixtures import TRACES

from curtail.api import DECISION_EVENTS
from curtail.config import TraceSource, parse_experiment
from curtail.planning.live_calendar import LiveCalendar, signals_from_readings
from curtail.planning.plan import plan_live_run, plan_recorded, plan_run
from curtail.planning.simulator import Simulator
from curtail.planning.traces import load_trace
from curtail.sources.base import SourceUnavailable
from curtail.sources.live_feed import PollingFeed
from curtail.sources.poller import RealtimePoller
from curtail.sources.trace_server import TraceServer
from curtail.sources.watttime import WattTimeSource

PAPER_TRACE = TRACES / "watttime_moer_2026-01-11_4regions.csv"
SITES = {"caiso": "CAISO_NORTH", "texas": "SPP_TX", "sa": "NEM_SA"}


def experiment(live: bool, duration_s: float = 12 * 3600.0):
    data = {
        "name": "live-test",
        "token_budget": 1e12,  # never reached: both runs follow the signal to the deadline
        "sites": {name: {"region": region, "tokens_per_s": 5.0, "training_power_w": 2024, "idle_power_w": 468}
                  for name, region in SITES.items()},
        "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": list(SITES)}],
    }
    if live:
        data["live"] = {"source": {"kind": "served_trace", "path": str(PAPER_TRACE)}, "duration_s": duration_s}
        data["training"] = {"clock": "realtime", "realtime_speedup": 600.0}
    else:
        data["traces"] = [{"path": str(PAPER_TRACE)}]
    return parse_experiment(data)


class RunClockServer:
    """A trace server whose clock is the run's: set ``t_s`` before each question (speedup 1)."""

    def __init__(self):
        signals = load_trace(TraceSource(path=PAPER_TRACE)).signals
        self.t_s = min(s.start_s for s in signals.values())
        self.server = TraceServer(signals, speedup=1.0, clock=lambda: self.t_s)


class FollowingFeed:
    """Moves the server's clock to the run's before the poll (what the real-time clock does)."""

    def __init__(self, clocked: RunClockServer, feed: PollingFeed):
        self.clocked, self.feed = clocked, feed

    def readings_until(self, t_s):
        self.clocked.t_s = max(self.clocked.t_s, t_s)
        return self.feed.readings_until(t_s)


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setenv("WATTTIME_USER", "anyone")
    monkeypatch.setenv("WATTTIME_PASSWORD", "anything")
    clocked = RunClockServer()
    with clocked.server:
        yield clocked


def live_run(clocked: RunClockServer, *, ahead_s: float = 0.0, **poller_options):
    config = experiment(live=True)
    run = config.runs[0]
    source = WattTimeSource(base_url=clocked.server.url, timeout_s=30.0)  # a loaded CI box must not time out
    poller = RealtimePoller(source, sorted(SITES.values()), refresh_s=config.rules.poll_s, **poller_options)
    feed = PollingFeed(SITES, poller, lost_ci_g_per_kwh=config.live.lost_ci_g_per_kwh)
    following = FollowingFeed(clocked, feed)
    if ahead_s:  # the source runs ahead of the run: the latest sample is in the run's future
        following.readings_until = lambda t_s: (setattr(clocked, "t_s", max(clocked.t_s, t_s + ahead_s))
                                                or feed.readings_until(t_s))
    calendar = LiveCalendar(list(SITES), config.rules, following)
    start_s = calendar.start(clocked.t_s)
    plan = plan_live_run(config, run, calendar, start_s)
    return config, plan, Simulator(plan.context, plan.policy).run(), poller


def decisions(trajectory, until_s=math.inf):
    return [(e.t_s, e.site, e.event) for e in trajectory.events if e.event in DECISION_EVENTS and e.t_s < until_s]


def test_a_served_trace_followed_live_decides_as_the_offline_run(served):
    _, plan, live, _ = live_run(served)
    offline_config = experiment(live=False)
    offline_plan = plan_run(offline_config, offline_config.runs[0], load_trace(TraceSource(path=PAPER_TRACE)))
    offline = Simulator(offline_plan.context, offline_plan.policy).run()
    assert live.finish_s == live.start_s + 12 * 3600
    assert decisions(live) == decisions(offline, until_s=live.finish_s)
    assert sum(1 for _ in decisions(live)) > 10
    assert not any(r.late for r in plan.calendar.applied)
    # the served clock never ran ahead of the run: every reading was learnt by its own time
    assert all(r.received_t_s >= r.sample_t_s for r in plan.calendar.applied)


def test_the_recorded_readings_replay_the_live_decisions(served):
    config, plan, live, _ = live_run(served, ahead_s=1800.0)  # six samples ahead: history fills in
    regions = dict(SITES)
    signals = signals_from_readings(plan.calendar.applied, live.finish_s, regions)
    replay_plan = plan_recorded(config, config.runs[0], signals, live.start_s, live.finish_s)
    replayed = Simulator(replay_plan.context, replay_plan.policy).run()
    assert decisions(replayed) == decisions(live)
    assert len(plan.calendar.applied) >= 3 * (12 * 12 - 1)  # every 5-minute sample of 12 h, per site


def test_a_lost_signal_closes_the_windows_and_recovers(served, monkeypatch):
    """The server stops answering for two hours of the run: no stale value is young enough and
    there is no fallback, so the feed assumes the lost value (windows close after the
    hysteresis); when it answers again the real readings take over."""
    clocked = served
    outage = (clocked.t_s + 3 * 3600, clocked.t_s + 5 * 3600)
    answer = WattTimeSource.latest

    def refused_during_the_outage(self, region, now_s=None):
        if outage[0] <= clocked.t_s < outage[1]:
            raise SourceUnavailable("watttime", "connection refused (test outage)")
        return answer(self, region, now_s)

    monkeypatch.setattr(WattTimeSource, "latest", refused_during_the_outage)
    config, plan, live, poller = live_run(clocked, max_stale_s=600.0, retry_s=60.0)
    kinds = {e.kind for e in poller.events}
    assert {"failed", "lost", "recovered"} <= kinds
    lost = [r for r in plan.calendar.applied if r.origin == "lost"]
    assert {r.site for r in lost} == set(SITES)
    assert all(outage[0] <= r.effective_t_s < outage[1] for r in lost)
    for site in SITES:
        after = [r for r in plan.calendar.applied if r.site == site and r.effective_t_s >= outage[1]]
        assert after and after[0].origin == "source"
    # no window opens during the outage once the last good value has gone stale
    signals = signals_from_readings(plan.calendar.applied, live.finish_s, dict(SITES))
    replay_plan = plan_recorded(config, config.runs[0], signals, live.start_s, live.finish_s)
    for site in SITES:
        for window in replay_plan.calendar.windows(site):
            assert not (outage[0] + 1200 <= window.open_s < outage[1])
    assert decisions(Simulator(replay_plan.context, replay_plan.policy).run()) == decisions(live)
