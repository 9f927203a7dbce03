"""The live calendar: pulled from a feed on the run's clock, it decides what the offline calendar
decides — on the trace itself when readings arrive on time, and always on the readings it recorded
(late ones at the poll they were learnt), which is what makes a live run replay exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_fixtures import HIGH, LOW, STEP_S, T0_S, TRACES, make_signal, pattern

from curtail.config import CurtailmentRules, TraceSource
from curtail.planning.live_calendar import (
    FedReading,
    LiveCalendar,
    LiveSignalError,
    TraceFeed,
    signals_from_readings,
)
from curtail.planning.signals import Signal
from curtail.planning.traces import load_trace
from curtail.planning.windows import CurtailmentCalendar

RULES = CurtailmentRules()  # < 100 g/kWh, 600 s hysteresis, 240 s provisioning, 10 s poll


def drive(calendar: LiveCalendar, start_s: float, end_s: float) -> list[tuple[float, dict]]:
    """Ask as a threshold policy would: at every instant ``next_change_after`` names."""
    t_s = calendar.start(start_s)
    asked = []
    while t_s < end_s:
        asked.append((t_s, calendar.states_at(t_s)))
        t_s = calendar.next_change_after(t_s)
    return asked


def change_instants(offline: CurtailmentCalendar, start_s: float, end_s: float) -> set[float]:
    changes = set()
    t_s = start_s
    while (t_s := offline.next_change_after(t_s)) is not None and t_s < end_s:
        changes.add(t_s)
    return changes


regular_rules = st.builds(
    CurtailmentRules,
    poll_s=st.sampled_from([1.0, 10.0, 60.0, 100.0, 300.0]),  # divide the 300-s step
    hysteresis_s=st.sampled_from([0.0, 10.0, 300.0, 600.0, 2000.0]),
    provisioning_s=st.sampled_from([0.0, 240.0, 1000.0]),
    threshold_kind=st.sampled_from(["absolute", "percentile"]),
    threshold_percentile=st.sampled_from([20.0, 50.0]),
    percentile_window_s=st.sampled_from([1234.5, 86400.0]),
)
values = st.lists(st.sampled_from([LOW, 99.0, 100.0, 101.0, HIGH]), min_size=2, max_size=40)


@settings(max_examples=150, deadline=None)
@given(samples=values, rules=regular_rules)
def test_on_time_readings_decide_as_the_offline_calendar(samples, rules):
    signal = make_signal(samples, region="s")
    offline = CurtailmentCalendar({"s": signal}, rules)
    live = LiveCalendar(["s"], rules, TraceFeed({"s": signal}))
    asked = drive(live, signal.start_s, signal.end_s)
    for t_s, states in asked:
        assert states == offline.states_at(t_s), t_s
    assert change_instants(offline, signal.start_s, signal.end_s) <= {t for t, _ in asked}
    assert not any(r.late for r in live.applied)


class DelayedFeed:
    """Hands each sample over ``delay_s`` after its time (a source publishing late), in order."""

    def __init__(self, signal: Signal, delays_s: list[float]):
        self.signal, self.delays_s = signal, delays_s
        self.next = 0

    def readings_until(self, t_s: float) -> list[FedReading]:
        out = []
        times = self.signal.times_s
        while self.next < len(times) and times[self.next] + self.delays_s[self.next] <= t_s:
            out.append(FedReading("s", float(times[self.next]), float(self.signal.ci_g_per_kwh[self.next])))
            self.next += 1
        return out


@settings(max_examples=150, deadline=None)
@given(
    samples=values,
    rules=regular_rules,
    gaps=st.lists(st.sampled_from([60.0, 290.0, 300.0, 310.0, 900.0]), min_size=40, max_size=40),
    delays=st.lists(st.sampled_from([0.0, 0.0, 5.0, 70.0, 400.0]), min_size=40, max_size=40),
)
def test_the_recorded_readings_replay_every_decision(samples, rules, gaps, delays):
    """Irregular samples, published late: the live calendar re-times what it learnt late, and
    the offline calendar of what it recorded decides exactly as it did, at every instant asked."""
    times = T0_S + np.concatenate(([0.0], np.cumsum(gaps[: len(samples) - 1])))
    signal = Signal("s", times, np.asarray(samples, dtype=float), STEP_S)
    delays[0] = 0.0
    live = LiveCalendar(["s"], rules, DelayedFeed(signal, delays), recheck_s=30.0)
    end_s = signal.end_s + 1000.0
    asked = drive(live, signal.start_s, end_s)
    recorded = signals_from_readings(live.applied, end_s, {"s": "s"})
    offline = CurtailmentCalendar(recorded, rules)
    for t_s, states in asked:
        assert states == offline.states_at(t_s), t_s
    assert change_instants(offline, signal.start_s, end_s) <= {t for t, _ in asked}
    effective = [r.effective_t_s for r in live.applied]
    assert effective == sorted(set(effective))
    for reading in live.applied:
        assert reading.effective_t_s >= reading.sample_t_s
        assert reading.received_t_s >= reading.sample_t_s


def test_a_late_reading_applies_from_the_poll_it_was_learnt():
    signal = make_signal(pattern("HHLLLL"), region="s")
    late = [0.0, 0.0, 125.0, 0.0, 0.0, 0.0]  # the first low sample is published 125 s late
    live = LiveCalendar(["s"], RULES, DelayedFeed(signal, late), recheck_s=60.0)
    asked = drive(live, signal.start_s, signal.end_s)
    low = next(r for r in live.applied if r.ci_g_per_kwh == LOW)
    assert low.sample_t_s == T0_S + 600 and low.late
    assert low.effective_t_s == T0_S + 780  # due at 600, published at 725: seen at the 780 recheck
    opened = next(t for t, states in asked if states["s"].value != "off")
    assert opened == T0_S + 780


def test_the_paper_trace_live_equals_offline():
    traces = load_trace(TraceSource(path=TRACES / "watttime_moer_2026-01-11_4regions.csv"))
    sites = {"caiso": "CAISO_NORTH", "texas": "SPP_TX", "sa": "NEM_SA"}
    signals = {site: traces.signals[region] for site, region in sites.items()}
    offline = CurtailmentCalendar(signals, RULES)
    live = LiveCalendar(list(sites), RULES, TraceFeed(signals))
    start_s, end_s = max(s.start_s for s in signals.values()), min(s.end_s for s in signals.values())
    asked = drive(live, start_s, end_s)
    for t_s, states in asked:
        assert states == offline.states_at(t_s)
    assert change_instants(offline, start_s, end_s) <= {t for t, _ in asked}
    assert offline.windows() and len(asked) < 2 * len(signals["caiso"].times_s) * len(sites)


def test_no_reading_for_a_site_is_a_clear_error():
    signal = make_signal(pattern("LL"), region="s")
    live = LiveCalendar(["s", "other"], RULES, TraceFeed({"s": signal}))
    with pytest.raises(LiveSignalError, match=r"no reading .* for sites \['other'\]"):
        live.start(signal.start_s)


def test_a_feed_passing_the_clock_is_refused():
    class Ahead:
        def readings_until(self, t_s):
            return [FedReading("s", t_s + 300.0, LOW)]

    live = LiveCalendar(["s"], RULES, Ahead())
    with pytest.raises(LiveSignalError, match="must not pass the run's clock"):
        live.start(T0_S)


def test_next_change_is_finite_and_rechecks_when_the_signal_stops():
    signal = make_signal(pattern("HH"), region="s")
    live = LiveCalendar(["s"], RULES, TraceFeed({"s": signal}), recheck_s=60.0)
    t_s = live.start(signal.start_s)
    t_s = live.next_change_after(t_s)
    assert t_s == T0_S + STEP_S
    later = [t_s := live.next_change_after(t_s) for _ in range(3)]
    assert later == [T0_S + 2 * STEP_S, T0_S + 2 * STEP_S + 60, T0_S + 2 * STEP_S + 120]
    assert all(math.isfinite(t) for t in later)
    assert HIGH  # the trace never curtails: nothing but polls are due
