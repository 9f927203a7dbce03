"""The live chain without Ray: the paper trace served as the WattTime API, polled by the real
client through the poller and the feed, into the live calendar, followed by the threshold policy
in the simulator — it decides what the offline run on the trace decides, its record replays those
decisions exactly, and the feed's handling of a source ahead of the run and of a lost signal."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from planning_fixtures import TRACES

from curtail.api import DECISION_EVENTS
from curtail.config import ForecastSource, TraceSource, parse_experiment
from curtail.planning.live_calendar import LiveCalendar, signals_from_readings
from curtail.planning.plan import load_experiment_traces, plan_live_run, plan_recorded, plan_run
from curtail.planning.simulator import Simulator
from curtail.planning.traces import load_forecast, load_trace
from curtail.sources.base import SourceUnavailable
from curtail.sources.live_feed import PollingFeed
from curtail.sources.live_forecasts import LiveForecasts, forecasts_from_records
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

    def __init__(self, path=PAPER_TRACE, forecasts=None, naive_timezone=None):
        signals = load_trace(TraceSource(path=path, naive_timezone=naive_timezone)).signals
        self.t_s = min(s.start_s for s in signals.values())
        self.server = TraceServer(signals, speedup=1.0, clock=lambda: self.t_s, forecasts=forecasts)


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


# ------------------------------------------------------------------ forecasts, live

CAISO_MONTH = TRACES / "watttime_moer_2023-06_caiso-north_actual.csv"
CAISO_FORECASTS = ForecastSource(
    path=TRACES / "watttime_moer_2023-06_caiso-north_forecast.csv.gz", region="Caiso_North", naive_timezone="UTC"
)
CAISO = {"caiso": "Caiso_North"}
FORECAST_POLICY = {"kind": "forecast", "min_window_s": 1800.0, "bridge_s": 1800.0}
BUDGET_POLICY = {"kind": "budget", "max_ci_g_per_kwh": 60.0, "history_s": 86400.0, "supply_margin": 1.5}


def caiso_experiment(policy, live: bool, days: float = 3.0):
    start = datetime(2023, 6, 8, tzinfo=UTC)
    data = {
        "name": "live-forecasts",
        "token_budget": 5e5 if policy["kind"] == "budget" else 1e12,
        "sites": {"caiso": {"region": "Caiso_North", "tokens_per_s": 5.0, "training_power_w": 2024,
                            "idle_power_w": 468}},
        "rules": {"provisioning_s": 600.0},
        "runs": [{"name": "r", "policy": policy, "sites": ["caiso"]}],
    }
    if live:
        data["live"] = {"source": {"kind": "served_trace", "path": str(CAISO_MONTH), "naive_timezone": "UTC",
                                   "forecast_path": str(CAISO_FORECASTS.path), "forecast_region": "Caiso_North"},
                        "duration_s": days * 86400}
        data["training"] = {"clock": "realtime", "realtime_speedup": 600.0}
    else:
        data["traces"] = [{"path": str(CAISO_MONTH), "naive_timezone": "UTC"}]
        data["forecasts"] = [CAISO_FORECASTS.model_dump(mode="json")]
        data["runs"][0]["deadline"] = (start + timedelta(days=days)).isoformat()
    return parse_experiment(data)


class FollowingSource:
    """A source whose server clock follows the run's to each forecast question."""

    def __init__(self, clocked: RunClockServer, source):
        self.clocked, self.source, self.name = clocked, source, source.name
        self.down = False

    def forecast(self, region, now_s=None, *, horizon_s=24 * 3600):
        self.clocked.t_s = max(self.clocked.t_s, now_s)
        if self.down:
            raise SourceUnavailable("watttime", "connection refused (test outage)")
        return self.source.forecast(region, now_s, horizon_s=horizon_s)


@pytest.fixture
def served_caiso(monkeypatch):
    monkeypatch.setenv("WATTTIME_USER", "anyone")
    monkeypatch.setenv("WATTTIME_PASSWORD", "anything")
    clocked = RunClockServer(CAISO_MONTH, {"Caiso_North": load_forecast(CAISO_FORECASTS)}, naive_timezone="UTC")
    with clocked.server:
        yield clocked


def live_forecast_run(clocked: RunClockServer, policy, outage=None):
    config = caiso_experiment(policy, live=True)
    source = WattTimeSource(base_url=clocked.server.url, timeout_s=30.0)
    poller = RealtimePoller(source, ["Caiso_North"], refresh_s=config.rules.poll_s)
    feed = FollowingFeed(clocked, PollingFeed(CAISO, poller, lost_ci_g_per_kwh=config.live.lost_ci_g_per_kwh))
    calendar = LiveCalendar(["caiso"], config.rules, feed)
    following = FollowingSource(clocked, source)
    events = []
    forecasts = LiveForecasts(CAISO, following, refresh_s=config.live.forecast_refresh_s,
                              on_event=lambda *event: events.append(event))
    if outage is not None:  # the forecast endpoint refuses between two run instants
        answer = following.forecast

        def refused_in_the_outage(region, now_s=None, *, horizon_s=24 * 3600):
            following.down = outage[0] <= now_s < outage[1]
            return answer(region, now_s, horizon_s=horizon_s)

        following.forecast = refused_in_the_outage
    start_s = calendar.start(clocked.t_s)
    forecasts.begin(start_s)
    plan = plan_live_run(config, config.runs[0], calendar, start_s, {"caiso": forecasts.for_site("caiso")})
    return config, plan, Simulator(plan.context, plan.policy).run(), forecasts, events


def replayed(config, plan, live, forecasts):
    deadline_s = live.start_s + config.live.duration_s
    signals = signals_from_readings(plan.calendar.applied, deadline_s, CAISO)
    read = forecasts_from_records(forecasts.received, CAISO)
    replay_plan = plan_recorded(config, config.runs[0], signals, live.start_s, deadline_s, read)
    return Simulator(replay_plan.context, replay_plan.policy).run()


def standby_starts(trajectory):
    """Provisions while the signal is above the threshold: pre-provisioning from a forecast."""
    return [e for e in trajectory.events if e.event == "provision" and e.details.get("intent") == "standby"]


def test_the_forecast_policy_followed_live_decides_as_the_offline_run(served_caiso):
    """Three days of the CAISO month served with WattTime's recorded forecasts: the forecast
    policy reading them live (fetched every 5 min on the run's clock) decides exactly what it
    decides offline on the trace and the forecast file, and the record replays it."""
    config, plan, live, forecasts, events = live_forecast_run(served_caiso, FORECAST_POLICY)
    offline_config = caiso_experiment(FORECAST_POLICY, live=False)
    offline_plan = plan_run(offline_config, offline_config.runs[0], *load_experiment_traces(offline_config))
    offline = Simulator(offline_plan.context, offline_plan.policy).run()
    assert decisions(live) == decisions(offline, until_s=live.finish_s)
    assert len(decisions(live)) > 10
    assert standby_starts(live)  # it pre-provisioned on a forecast opening
    assert len(forecasts.received) == 3 * 288  # one every 5 min
    assert all(f.source == "watttime" and len(f.targets_s) > 1 for f in forecasts.received)
    assert not events
    assert decisions(replayed(config, plan, live, forecasts)) == decisions(live)


def test_the_budget_policy_live_replays_exactly(served_caiso):
    config, plan, live, forecasts, _ = live_forecast_run(served_caiso, BUDGET_POLICY)
    assert live.completed and live.tokens == pytest.approx(config.token_budget)
    assert decisions(replayed(config, plan, live, forecasts)) == decisions(live)


def test_a_forecast_outage_is_an_event_and_the_policy_runs_on(served_caiso):
    start_s = served_caiso.t_s
    outage = (start_s + 86400.0, start_s + 86400.0 + 6 * 3600.0)
    config, plan, live, forecasts, events = live_forecast_run(served_caiso, FORECAST_POLICY, outage=outage)
    kinds = [(event[2], event[0]) for event in events]
    assert kinds == [("signal_forecast_failed", outage[0]), ("signal_forecast_recovered", outage[1])]
    assert not any(outage[0] <= f.effective_t_s < outage[1] for f in forecasts.received)
    assert live.finish_s == live.start_s + 3 * 86400
    assert decisions(replayed(config, plan, live, forecasts)) == decisions(live)


def test_forecasts_taken_back_after_a_crash_keep_the_refresh_grid():
    """A resumed run's forecasts: those recorded before the crash are read again, and the next
    fetch is on the run's refresh grid (from its start), not from the resume instant."""
    from curtail.planning.traces import Forecast
    from curtail.sources.live_forecasts import ReceivedForecast

    class Issuing:
        name = "fake"

        def __init__(self):
            self.asked: list[float] = []

        def forecast(self, region, now_s=None, *, horizon_s=0.0):
            self.asked.append(now_s)
            return Forecast(region, np.array([now_s]), np.array([0, 1]), np.array([now_s + 300.0]),
                            np.array([42.0]), "fake")

    start_s = 1_000_000.0
    before = [ReceivedForecast("caiso", start_s + k * 300.0, start_s + k * 300.0, (start_s + k * 300.0 + 300.0,),
                               (float(k),), "fake") for k in range(3)]
    source = Issuing()
    forecasts = LiveForecasts({"caiso": "CAISO_NORTH"}, source, refresh_s=300.0)
    forecasts.restore(before, start_s)
    view = forecasts.for_site("caiso")
    assert view.latest(start_s + 650.0)[1].tolist() == [2.0]  # the one fetched at +600, before the crash
    assert source.asked == []  # nothing due yet: +600 was fetched
    now_s = start_s + 1234.0  # resumed here, after lost time
    assert view.next_due_s(now_s) == start_s + 1500.0
    assert view.latest(now_s)[1].tolist() == [42.0] and source.asked == [now_s]  # overdue: fetched at once
    assert forecasts.next_due_s(now_s) == start_s + 1500.0
