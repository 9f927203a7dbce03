"""The curtailment calendar on hand-made 5-minute traces with known answers, and on the paper
trace (expected windows worked out from the data)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_fixtures import (
    HIGH,
    LOW,
    STEP_S,
    T0_S,
    TRACES,
    make_context,
    make_signal,
    pattern,
    simulate,
)

from curtail.api import simulate as simulate_experiment
from curtail.config import CurtailmentRules, ExecutionConfig, TraceSource, parse_experiment
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.policy import SiteState
from curtail.planning.traces import load_trace
from curtail.planning.windows import (
    CurtailmentCalendar,
    WindowState,
    compute_windows,
    compute_windows_stepwise,
)

RULES = (
    CurtailmentRules()
)  # the prior system's: < 100 g/kWh, 600 s hysteresis, 240 s provisioning, 10 s poll


def windows_of(spec: str, rules: CurtailmentRules = RULES) -> list[tuple[float, float]]:
    """(open, close) of each window, in seconds after T0."""
    return [
        (w.open_s - T0_S, w.close_s - T0_S)
        for w in compute_windows("s", make_signal(pattern(spec)), rules)
    ]


def calendar_of(spec: str, rules: CurtailmentRules = RULES) -> CurtailmentCalendar:
    return CurtailmentCalendar({"s": make_signal(pattern(spec))}, rules)


def state(calendar: CurtailmentCalendar, after_s: float) -> WindowState:
    return calendar.state_at("s", T0_S + after_s)


# ------------------------------------------------------------------------------- opening


def test_opens_at_the_first_sample_below():
    assert windows_of("HHHLLLLL") == [(900, 2400)]  # stays open to the trace end (8 × 300 s)
    assert windows_of("LLLL") == [(0, 1200)]
    assert windows_of("HHHH") == []


@pytest.mark.parametrize("poll_s, open_s", [(10, 900), (7, 903), (70, 910), (600, 1200)])
def test_opening_is_rounded_up_to_the_poll_grid(poll_s, open_s):
    rules = CurtailmentRules(poll_s=poll_s)
    assert windows_of("HHHLLLLL", rules)[0][0] == open_s


def test_a_sample_no_poll_sees_is_ignored():
    # polls every 600 s see the samples at 0, 600, 1200, ... only: the low sample at 300 is missed
    assert windows_of("HLHHHH", CurtailmentRules(poll_s=600)) == []
    # the high sample at 900 is unseen too: the window closes when the poll at 1200 sees a high one
    assert windows_of("HHLHHH", CurtailmentRules(poll_s=600, hysteresis_s=0)) == [(600, 1200)]


# ------------------------------------------------------------------------------- hysteresis


def test_two_samples_above_do_not_close():
    # above at 900 and 1200 (600 s of signal above) but the poll at 1500 sees a low sample: cancelled
    calendar = calendar_of("LLLHHLLL")
    [window] = calendar.windows("s")
    assert (window.open_s - T0_S, window.close_s - T0_S) == (0, 2400)
    assert [(a - T0_S, b - T0_S) for a, b in window.draining_s] == [(900, 1500)]


def test_three_samples_above_close_600_s_after_the_first():
    assert windows_of("LLLHHHLLL") == [(0, 1500), (1800, 2700)]
    assert windows_of("LLLHHHHHHL") == [(0, 1500), (2700, 3000)]


@pytest.mark.parametrize(
    "hysteresis_s, close_s", [(0, 900), (300, 1200), (299, 1200), (301, 1210), (900, 1800)]
)
def test_hysteresis_length(hysteresis_s, close_s):
    # above from 900: the window closes at the first poll at least hysteresis_s later
    assert windows_of("LLLHHHHHH", CurtailmentRules(hysteresis_s=hysteresis_s))[0][1] == close_s


def test_sample_at_threshold_cancels_but_does_not_open():
    assert windows_of("HHTTHH") == []  # at the threshold is not below it
    assert windows_of("HTLH") == [(600, 1200)]
    # countdown from 600 cancelled by the T at 1200; a new one from 1500 closes at 2100
    calendar = calendar_of("LLHHTHHHL")
    assert [(w.open_s - T0_S, w.close_s - T0_S) for w in calendar.windows("s")] == [
        (0, 2100),
        (2400, 2700),
    ]
    first = calendar.windows("s")[0]
    assert [(a - T0_S, b - T0_S) for a, b in first.draining_s] == [(600, 1200), (1500, 2100)]
    assert (
        state(calendar, 1200) is WindowState.READY and state(calendar, 1500) is WindowState.DRAINING
    )


def test_custom_threshold():
    signal = make_signal([150, 90, 120, 120, 120, 80])
    assert [
        w.open_s - T0_S
        for w in compute_windows("s", signal, CurtailmentRules(threshold_g_per_kwh=95))
    ] == [300, 1500]
    assert compute_windows("s", signal, CurtailmentRules(threshold_g_per_kwh=200))[0].open_s == T0_S


# ------------------------------------------------------------------------------- states


def test_provisioning_for_240_s_then_ready():
    calendar = calendar_of("HLLLLL")
    assert state(calendar, 0) is WindowState.OFF and state(calendar, 299) is WindowState.OFF
    assert (
        state(calendar, 300) is WindowState.PROVISIONING
        and state(calendar, 539.9) is WindowState.PROVISIONING
    )
    assert state(calendar, 540) is WindowState.READY and state(calendar, 1799) is WindowState.READY
    assert calendar.windows("s")[0].ready_s == T0_S + 540


def test_draining_during_a_countdown_then_off():
    calendar = calendar_of("LLLHHHLL")
    assert state(calendar, 899) is WindowState.READY
    assert (
        state(calendar, 900) is WindowState.DRAINING
        and state(calendar, 1499) is WindowState.DRAINING
    )
    assert state(calendar, 1500) is WindowState.OFF and state(calendar, 1799) is WindowState.OFF
    assert (
        state(calendar, 1800) is WindowState.PROVISIONING
        and state(calendar, 2040) is WindowState.READY
    )
    cancelled = calendar_of("LLLHHLLL")
    assert (
        state(cancelled, 1200) is WindowState.DRAINING
        and state(cancelled, 1500) is WindowState.READY
    )
    # off the sample grid (polls every 7 s) the countdown runs from the poll that saw the first
    # high sample (903) to the poll that saw the low one (1505)
    sparse = calendar_of("LLLHHLLL", CurtailmentRules(poll_s=7))
    assert [(a - T0_S, b - T0_S) for a, b in sparse.windows("s")[0].draining_s] == [(903, 1505)]
    assert state(sparse, 1504) is WindowState.DRAINING and state(sparse, 1505) is WindowState.READY


def test_next_change_after():
    calendar = calendar_of(
        "HLLLHHHL"
    )  # open 300, ready 540, drain 1200, close 1800, open 2100, ready 2340, end 2400
    expected = [300, 540, 1200, 1800, 2100, 2340, 2400]
    t, seen = T0_S, []
    while (t := calendar.next_change_after(t)) is not None:
        seen.append(t - T0_S)
    assert seen == expected
    assert calendar.next_change_after(T0_S + 1000) == T0_S + 1200
    assert calendar.next_change_after(T0_S + 1200) == T0_S + 1800  # strictly after


def test_window_shorter_than_provisioning_never_becomes_ready():
    rules = CurtailmentRules(hysteresis_s=0, provisioning_s=600)
    calendar = calendar_of("HLHHHH", rules)
    [window] = calendar.windows("s")
    assert (window.open_s, window.close_s, window.ready_s) == (T0_S + 300, T0_S + 600, T0_S + 600)
    states = {state(calendar, t) for t in np.arange(0, 1800, 10)}
    assert states == {WindowState.OFF, WindowState.PROVISIONING}
    # and the threshold policy never trains there: provisioned-idle for the 300 s, then drained
    context = make_context(
        {"s": pattern("HLHHHH")}, rules=rules, execution=ExecutionConfig(group_start_s=0)
    )
    trajectory = simulate(context)
    assert trajectory.tokens == 0
    assert [
        (i.state, i.start_s - T0_S, i.end_s - T0_S)
        for i in trajectory.intervals
        if i.state.provisioned
    ] == [(SiteState.PROVISIONING, 300, 600)]


def test_calendar_sites_and_queries():
    calendar = CurtailmentCalendar(
        {"a": make_signal(pattern("HHLLLL")), "b": make_signal(pattern("LLLHHH"))}, RULES
    )
    assert calendar.sites == ["a", "b"]
    assert [(w.site, w.open_s - T0_S) for w in calendar.windows()] == [("b", 0), ("a", 600)]
    assert calendar.states_at(T0_S + 600) == {"a": WindowState.PROVISIONING, "b": WindowState.READY}
    assert (
        calendar.window_at("a", T0_S + 599) is None
        and calendar.window_at("a", T0_S + 600).site == "a"
    )
    assert calendar.curtailed_seconds("a", T0_S, T0_S + 1800) == 1200
    assert calendar.curtailed_seconds("b", T0_S + 150, T0_S + 1000) == 750


# ------------------------------------------------------------------------------- reference


def reference_windows(times_s, values, end_s, threshold=100.0, steps_above_to_close=3):
    """The rules for 5-minute samples on a 10 s poll grid with 600 s hysteresis, written out
    plainly: open at a sample below; close at the third consecutive sample above."""
    windows, open_s, above = [], None, 0
    for t, v in zip(times_s, values):
        if open_s is None:
            if v < threshold:
                open_s, above = t, 0
        elif v > threshold:
            above += 1
            if above == steps_above_to_close:
                windows.append((open_s, t))
                open_s = None
        else:
            above = 0
    if open_s is not None:
        windows.append((open_s, end_s))
    return windows


def test_paper_trace_caiso_north_windows():
    path = TRACES / "watttime_moer_2026-01-11_4regions.csv"
    frame = pd.read_csv(path)
    times = pd.to_datetime(frame["point_time"], utc=True)
    caiso = frame["CAISO_NORTH"].to_numpy()
    # by hand from the data: low from 17:05; high at 19:05, 19:10, 19:15; low again at 19:20;
    # high from 23:25 to the end
    assert caiso[0] > 100 and caiso[1] < 100 and times[1] == pd.Timestamp("2026-01-11T17:05Z")
    first_high = next(times[i] for i in range(2, len(caiso) - 2) if (caiso[i : i + 3] > 100).all())
    assert first_high == pd.Timestamp("2026-01-11T19:05Z") and caiso[28] < 100
    assert (
        (caiso[77:] > 100).all()
        and caiso[76] < 100
        and times[77] == pd.Timestamp("2026-01-11T23:25Z")
    )

    signals = load_trace(TraceSource(path=path)).signals
    calendar = CurtailmentCalendar(signals, RULES)
    got = [
        (pd.Timestamp(w.open_s, unit="s", tz="UTC"), pd.Timestamp(w.close_s, unit="s", tz="UTC"))
        for w in calendar.windows("CAISO_NORTH")
    ]
    assert got == [
        (pd.Timestamp("2026-01-11T17:05Z"), pd.Timestamp("2026-01-11T19:15Z")),
        (pd.Timestamp("2026-01-11T19:20Z"), pd.Timestamp("2026-01-11T23:35Z")),
    ]
    assert (
        calendar.windows("CAISO_NORTH")[0].ready_s == pd.Timestamp("2026-01-11T17:09Z").timestamp()
    )
    for region, signal in signals.items():
        expected = reference_windows(signal.times_s, signal.ci_g_per_kwh, signal.end_s)
        assert [(w.open_s, w.close_s) for w in calendar.windows(region)] == expected, region
    assert calendar.windows("DE") == []
    assert len(calendar.windows("NEM_SA")) == 1 and len(calendar.windows("SPP_TX")) == 1


@settings(max_examples=300, deadline=None)
@given(
    spec=st.text("LHT", min_size=1, max_size=40),
    poll_s=st.sampled_from([1, 7, 10, 60, 70, 299, 300, 301, 900]),
    hysteresis_s=st.sampled_from([0, 10, 299, 300, 301, 600, 900, 2000]),
    provisioning_s=st.sampled_from([0, 240, 1000]),
)
def test_vectorised_windows_match_the_stepwise_definition(
    spec, poll_s, hysteresis_s, provisioning_s
):
    rules = CurtailmentRules(
        poll_s=poll_s, hysteresis_s=hysteresis_s, provisioning_s=provisioning_s
    )
    signal = make_signal(pattern(spec))
    assert compute_windows("s", signal, rules) == compute_windows_stepwise("s", signal, rules)


@settings(max_examples=150, deadline=None)
@given(spec=st.text("LHT", min_size=1, max_size=40), cut=st.integers(1, 40))
def test_matches_reference_and_is_causal(spec, cut):
    signal = make_signal(pattern(spec))
    windows = [(w.open_s, w.close_s) for w in compute_windows("s", signal, RULES)]
    assert windows == reference_windows(signal.times_s, signal.ci_g_per_kwh, signal.end_s)
    # whatever happens after a prefix does not change the windows decided within it
    prefix = spec[: min(cut, len(spec))]
    prefix_end = T0_S + STEP_S * len(prefix)
    early = [(o, c) for o, c in windows if o < prefix_end]
    prefix_windows = [
        (w.open_s, w.close_s) for w in compute_windows("s", make_signal(pattern(prefix)), RULES)
    ]
    assert [o for o, _ in prefix_windows] == [o for o, _ in early]
    assert [c for _, c in prefix_windows[:-1]] == [c for _, c in early[:-1]]
    if prefix_windows:
        assert prefix_windows[-1][1] == min(early[-1][1], prefix_end)
    assert LOW < 100 < HIGH


# ------------------------------------------------------------------------------- percentile runs


def experiment_on(trace_rules: dict, *, start: str | None = None, average: bool = False, site_hours: float = 10):
    """The paper's three sites (marginal), or Germany and Great Britain 2020 (average)."""
    site = {"training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": 191_454}
    if average:
        traces = [
            {"path": str(TRACES / f"avg_ci_2020_{name}.csv"), "signal": "average",
             "naive_timezone": "UTC", "columns": {"Carbon Intensity": region}}
            for name, region in (("germany", "DE"), ("great-britain", "GB"))
        ]
        sites = {"de": {"region": "DE", **site}, "gb": {"region": "GB", **site}}
    else:
        traces = [{"path": str(TRACES / "watttime_moer_2026-01-11_4regions.csv")}]
        sites = {name.lower(): {"region": name, **site} for name in ("CAISO_NORTH", "SPP_TX", "NEM_SA")}
    run = {"name": "threshold", "policy": {"kind": "threshold"}, "sites": sorted(sites)}
    if start is not None:
        run.update(start=start, deadline=start.replace("-01T", "-08T"))
    return parse_experiment(
        {"token_budget": 191_454 * 3600 * site_hours, "traces": traces, "rules": trace_rules, "sites": sites,
         "runs": [run]}
    )


PERCENTILE_RULE = {"threshold_kind": "percentile", "threshold_percentile": 20}


def warned_sites(caplog, experiment) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="curtail.planning.windows"):
        traces, _ = load_experiment_traces(experiment)
        plan_run(experiment, experiment.runs[0], traces)
    return [r.args[0] for r in caplog.records if "percentile_window_s" in r.getMessage()]


def test_a_trace_shorter_than_the_percentile_window_is_warned_about(caplog):
    paper = experiment_on(PERCENTILE_RULE)  # 18 hours of history at most, the window is a week
    assert warned_sites(caplog, paper) == ["caiso_north", "nem_sa", "spp_tx"]
    message = caplog.records[0].getMessage()
    assert "0.0 h of history before the run starts" in message and "(168.0 h)" in message
    assert "shorten percentile_window_s" in message
    assert warned_sites(caplog, experiment_on({"threshold_g_per_kwh": 100})) == []  # absolute: no past needed
    germany = experiment_on(PERCENTILE_RULE, average=True)  # from the trace start: no past
    assert warned_sites(caplog, germany) == ["de", "gb"]
    march = experiment_on(PERCENTILE_RULE, average=True, start="2020-03-01T00:00:00Z")  # 10 weeks back
    assert warned_sites(caplog, march) == []


def test_a_percentile_run_reports_its_rule_and_per_site_thresholds():
    experiment = experiment_on(PERCENTILE_RULE, average=True, start="2020-03-01T00:00:00Z", site_hours=40)
    summary = simulate_experiment(experiment, write=False).summary("threshold")
    assert summary["completed"] and summary["hours"] > 72
    assert summary["threshold_kind"] == "percentile" and summary["threshold_g_per_kwh"] is None
    assert summary["threshold_percentile"] == 20 and summary["percentile_window_s"] == 7 * 86400
    thresholds = summary["thresholds_g_per_kwh_by_site"]
    assert set(thresholds) == {"de", "gb"}
    for levels in thresholds.values():  # a trailing percentile moves with the grid
        assert 100 < levels["min"] < levels["median"] < levels["max"] < 400
    assert thresholds["de"] != thresholds["gb"]
    traces, _ = load_experiment_traces(experiment)
    calendar = plan_run(experiment, experiment.runs[0], traces).calendar
    at_start = calendar.threshold_at("de", summary_start_s(summary))
    assert thresholds["de"]["min"] <= at_start <= thresholds["de"]["max"]


def summary_start_s(summary: dict) -> float:
    return pd.Timestamp(summary["start"]).timestamp()


def test_an_absolute_run_reports_its_level():
    summary = simulate_experiment(experiment_on({"threshold_g_per_kwh": 100}), write=False).summary("threshold")
    assert summary["threshold_kind"] == "absolute" and summary["threshold_g_per_kwh"] == 100
    assert summary["threshold_percentile"] is None and summary["percentile_window_s"] is None
    assert summary["thresholds_g_per_kwh_by_site"]["caiso_north"] == {"min": 100, "median": 100, "max": 100}
