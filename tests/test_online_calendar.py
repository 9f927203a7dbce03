"""The online calendar against the offline one: same samples, same windows and states; repeats,
late readings, the reorder buffer and the causal percentile threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_fixtures import HIGH, LOW, STEP_S, T0_S, TRACES, make_signal, pattern

from curtail.config import CurtailmentRules, TraceSource
from curtail.planning.online_calendar import (
    ConflictingReadingError,
    LateReadingError,
    NotYetKnownError,
    OnlineCalendar,
    ReadingError,
)
from curtail.planning.signals import Signal
from curtail.planning.traces import load_trace
from curtail.planning.windows import (
    CurtailmentCalendar,
    WindowState,
    compute_windows,
    curtailment_thresholds,
)

RULES = CurtailmentRules()  # < 100 g/kWh, 600 s hysteresis, 240 s provisioning, 10 s poll


def fed(signal: Signal, rules: CurtailmentRules = RULES, site: str = "s") -> OnlineCalendar:
    calendar = OnlineCalendar(site, rules)
    for t_s, value in zip(signal.times_s.tolist(), signal.ci_g_per_kwh.tolist()):
        assert calendar.add(t_s, value) is True
    return calendar


def irregular_signal(steps_s: list[float], values: list[float], resolution_s: float = STEP_S) -> Signal:
    times = T0_S + np.concatenate(([0.0], np.cumsum(steps_s[: len(values) - 1])))
    return Signal("s", times, np.asarray(values, dtype=float), resolution_s)


# Random traces: values around the 100 g/kWh threshold (exactly at it too), 5-minute samples
# with late, early and missing ones (gaps up to the loader's default max_gap_s of 1 h).
values_near_threshold = st.sampled_from([LOW, 99.0, 100.0, 101.0, HIGH])
steps = st.sampled_from([60.0, 290.0, 300.0, 300.0, 300.0, 310.0, 900.0, 3600.0])
any_rules = st.builds(
    CurtailmentRules,
    poll_s=st.sampled_from([1.0, 7.0, 10.0, 60.0, 300.0, 301.0, 900.0]),
    hysteresis_s=st.sampled_from([0.0, 10.0, 300.0, 600.0, 2000.0]),
    provisioning_s=st.sampled_from([0.0, 240.0, 1000.0]),
    threshold_kind=st.sampled_from(["absolute", "percentile"]),
    threshold_percentile=st.sampled_from([10.0, 20.0, 50.0, 73.0]),
    percentile_window_s=st.sampled_from([600.0, 1234.5, 3600.0, 86400.0]),
)


@st.composite
def traces(draw, max_size: int = 30) -> Signal:
    values = draw(st.lists(values_near_threshold, min_size=1, max_size=max_size))
    gaps = draw(st.lists(steps, min_size=len(values), max_size=len(values)))
    return irregular_signal(gaps, values, resolution_s=draw(steps))


# ------------------------------------------------------------------------------- equal to offline


@settings(max_examples=150, deadline=None)
@given(signal=traces(), rules=any_rules)
def test_in_order_readings_give_the_offline_calendar_on_every_prefix(signal, rules):
    offline = CurtailmentCalendar({"s": signal}, rules)
    online = OnlineCalendar("s", rules)
    times, values = signal.times_s.tolist(), signal.ci_g_per_kwh.tolist()
    for k, (t_s, value) in enumerate(zip(times, values)):
        online.add(t_s, value)
        assert online.now_s == t_s
        prefix = Signal("s", signal.times_s[: k + 1], signal.ci_g_per_kwh[: k + 1], signal.resolution_s)
        # the windows of the prefix as a trace, and the states the whole trace has up to now
        assert online.windows(until_s=prefix.end_s) == compute_windows("s", prefix, rules)
        for t in (t_s, t_s - rules.poll_s / 2, t_s - rules.hysteresis_s, times[max(k - 1, 0)]):
            assert online.state_at(t) is offline.state_at("s", t), (k, t)
    assert online.windows(until_s=signal.end_s) == offline.windows("s")
    assert [online.threshold_at(t) for t in times] == offline.thresholds("s").tolist()


def test_paper_trace_fed_reading_by_reading():
    signals = load_trace(TraceSource(path=TRACES / "watttime_moer_2026-01-11_4regions.csv")).signals
    offline = CurtailmentCalendar(signals, RULES)
    for region, signal in signals.items():
        online = fed(signal, site=region)
        assert online.windows(until_s=signal.end_s) == offline.windows(region), region
        for t in np.arange(signal.start_s, signal.times_s[-1] + 1, RULES.poll_s).tolist():
            assert online.state_at(t) is offline.state_at(region, t), (region, t)
    assert len(offline.windows("CAISO_NORTH")) == 2  # the test compares real windows


def test_now_is_the_newest_reading_and_nothing_beyond_is_answered():
    online = OnlineCalendar("s", RULES)
    with pytest.raises(NotYetKnownError, match="no reading applied yet"):
        online.state_at(T0_S)
    online.add(T0_S, HIGH)
    online.add(T0_S + 300, LOW)  # the poll at 300 s sees it: the window opens at now
    assert online.now_s == T0_S + 300
    assert online.state_at(T0_S + 300) is WindowState.PROVISIONING
    assert online.state_at(T0_S + 299) is WindowState.OFF and online.in_window_at(T0_S + 300)
    assert online.windows() == []  # zero length so far
    with pytest.raises(NotYetKnownError, match="after now_s"):
        online.state_at(T0_S + 301)
    with pytest.raises(NotYetKnownError, match="after now_s"):
        online.threshold_at(T0_S + 301)
    with pytest.raises(ValueError, match="until_s"):
        online.windows(until_s=T0_S + 299)
    # held on, the newest reading gives the window the offline calendar has for this trace
    [window] = online.windows(until_s=T0_S + 600)
    assert (window.open_s, window.ready_s, window.close_s) == (T0_S + 300, T0_S + 540, T0_S + 600)


def test_an_open_window_is_cut_at_now_and_grows_with_readings():
    online = fed(make_signal(pattern("HLLL")))
    [window] = online.windows()
    assert (window.open_s, window.close_s) == (T0_S + 300, T0_S + 900)
    for k in range(4, 7):  # three highs close it 600 s after the first
        online.add(T0_S + k * STEP_S, HIGH)
    [window] = online.windows()
    assert (window.open_s, window.close_s) == (T0_S + 300, T0_S + 1800)
    assert window.draining_s == ((T0_S + 1200, T0_S + 1800),)
    assert online.state_at(T0_S + 1799) is WindowState.DRAINING
    assert online.state_at(T0_S + 1800) is WindowState.OFF


# ------------------------------------------------------------------------------- repeats


@settings(max_examples=80, deadline=None)
@given(signal=traces(), repeats=st.lists(st.integers(0, 29), max_size=10))
def test_repeated_readings_change_nothing(signal, repeats):
    online = OnlineCalendar("s", RULES)
    times, values = signal.times_s.tolist(), signal.ci_g_per_kwh.tolist()
    for k, (t_s, value) in enumerate(zip(times, values)):
        assert online.add(t_s, value) is True
        for j in repeats:  # again: the newest, or an older one
            if j <= k:
                assert online.add(times[j], values[j]) is False
    assert online.windows(until_s=signal.end_s) == compute_windows("s", signal, RULES)
    assert [r.t_s for r in online.readings] == times


def test_a_revised_value_is_an_error_naming_both():
    online = fed(make_signal([LOW, HIGH]))
    before = online.windows(until_s=T0_S + 900)
    with pytest.raises(ConflictingReadingError, match=r"123\.0 gCO2/kWh but 50\.0 gCO2/kWh"):
        online.add(T0_S, 123.0)
    assert online.windows(until_s=T0_S + 900) == before
    buffered = OnlineCalendar("s", RULES, reorder_tolerance_s=600)
    buffered.add(T0_S, LOW)  # waits in the buffer
    with pytest.raises(ConflictingReadingError, match=r"400\.0 gCO2/kWh but 50\.0"):
        buffered.add(T0_S, HIGH)


@pytest.mark.parametrize("value", [math.nan, -1.0, math.inf])
def test_invalid_values_are_refused(value):
    with pytest.raises(ReadingError, match="finite intensity >= 0"):
        OnlineCalendar("s", RULES).add(T0_S, value)
    with pytest.raises(ReadingError, match="not finite"):
        OnlineCalendar("s", RULES).add(math.nan, LOW)


# ------------------------------------------------------------------------------- late readings


def test_a_late_reading_is_refused_without_a_tolerance():
    online = fed(make_signal(pattern("HLLH")))
    before = online.windows()
    with pytest.raises(LateReadingError, match="raise reorder_tolerance_s"):
        online.add(T0_S + 450, HIGH)
    assert online.windows() == before and online.now_s == T0_S + 900


@settings(max_examples=100, deadline=None)
@given(
    signal=traces(),
    rules=any_rules,
    tolerance_s=st.sampled_from([1.0, 300.0, 1000.0, 4000.0]),
    data=st.data(),
)
def test_readings_out_of_order_within_the_tolerance_give_the_offline_calendar(signal, rules, tolerance_s, data):
    times, values = signal.times_s.tolist(), signal.ci_g_per_kwh.tolist()
    # each reading delayed by less than the tolerance: none arrives after one tolerance_s newer
    delays = data.draw(st.lists(st.floats(0, tolerance_s, exclude_max=True), min_size=len(times), max_size=len(times)))
    arrival = sorted(range(len(times)), key=lambda i: (times[i] + delays[i], i))
    offline = CurtailmentCalendar({"s": signal}, rules)
    online = OnlineCalendar("s", rules, reorder_tolerance_s=tolerance_s)
    for i in arrival:
        online.add(times[i], values[i])
        if online.now_s is not None:  # what is decided is what the whole trace decides
            assert online.now_s <= times[-1]
            assert online.state_at(online.now_s) is offline.state_at("s", online.now_s)
    online.flush()
    assert online.now_s == times[-1]
    assert online.windows(until_s=signal.end_s) == offline.windows("s")


def test_the_buffer_holds_readings_until_the_tolerance_passes():
    online = OnlineCalendar("s", RULES, reorder_tolerance_s=600)
    online.add(T0_S + 300, LOW)
    online.add(T0_S, HIGH)  # late by 300 s: within the tolerance
    with pytest.raises(NotYetKnownError, match="2 buffered"):
        online.windows()
    online.add(T0_S + 900, LOW)  # the watermark passes 0 and 300
    assert online.now_s == T0_S + 300 and [r.t_s for r in online.readings] == [T0_S, T0_S + 300]
    assert online.state_at(T0_S + 300) is WindowState.PROVISIONING
    with pytest.raises(LateReadingError, match="reorder_tolerance_s = 600"):
        online.add(T0_S + 200, LOW)  # older than the watermark: its instant is decided
    online.flush()
    assert online.now_s == T0_S + 900
    with pytest.raises(LateReadingError):
        online.add(T0_S + 600, LOW)
    applied = irregular_signal([300.0, 600.0], [HIGH, LOW, LOW])  # ends at 1200 s
    assert online.windows(until_s=applied.end_s) == compute_windows("s", applied, RULES)
    assert [(w.open_s - T0_S, w.close_s - T0_S) for w in online.windows(until_s=applied.end_s)] == [(300, 1200)]


def test_a_reading_at_the_watermark_is_late():
    # now_s = 300 s was answered with the reading at 0 s holding: a reading for 300 s is too late
    online = OnlineCalendar("s", RULES, reorder_tolerance_s=600)
    online.add(T0_S, HIGH)
    online.add(T0_S + 900, LOW)
    assert online.now_s == T0_S + 300 and online.state_at(T0_S + 300) is WindowState.OFF
    with pytest.raises(LateReadingError):
        online.add(T0_S + 300, LOW)
    assert online.state_at(T0_S + 300) is WindowState.OFF


# ------------------------------------------------------------------------------- percentile


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.integers(0, 400).map(float) | st.floats(0, 400), min_size=1, max_size=40),
    gaps=st.lists(steps, min_size=40, max_size=40),
    percentile=st.floats(1, 99),
    window_s=st.sampled_from([300.0, 600.0, 1234.5, 3600.0, 86400.0]),
)
def test_the_percentile_uses_past_readings_only_and_equals_the_offline_prefix(values, gaps, percentile, window_s):
    rules = CurtailmentRules(
        threshold_kind="percentile", threshold_percentile=percentile, percentile_window_s=window_s
    )
    signal = irregular_signal(gaps, values)
    online = OnlineCalendar("s", rules)
    for k, (t_s, value) in enumerate(zip(signal.times_s.tolist(), values)):
        online.add(t_s, value)
        prefix = Signal("s", signal.times_s[: k + 1], signal.ci_g_per_kwh[: k + 1], STEP_S)
        assert online.threshold_at(t_s) == curtailment_thresholds(prefix, rules)[-1]  # bit for bit


def test_the_causal_percentile_is_not_the_whole_trace_percentile():
    # a grid getting cleaner: compared with its past only, each reading is the lowest yet
    rules = CurtailmentRules(threshold_kind="percentile", threshold_percentile=20)
    signal = make_signal([300.0, 250.0, 200.0, 150.0, 100.0, 50.0])
    online = fed(signal, rules)
    causal = [online.threshold_at(t) for t in signal.times_s.tolist()]
    assert causal[0] == 300.0 and causal[1] == 260.0  # itself; then 250 + 0.2 × 50
    whole_trace = float(np.percentile(signal.ci_g_per_kwh, 20))
    assert whole_trace == 100.0 and all(c > whole_trace for c in causal[:-1])
    # every reading is below its threshold from the second on: one window from 300 s
    assert [(w.open_s - T0_S, w.close_s - T0_S) for w in online.windows(until_s=signal.end_s)] == [(300, 1800)]
