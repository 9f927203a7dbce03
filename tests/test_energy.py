"""Energy and emissions: hand-worked integrals of power × time × carbon intensity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_fixtures import IDLE_W, T0_S, TRAINING_W, make_signal

from curtail.config import CurtailmentRules, SiteConfig
from curtail.planning.energy import Interval, PowerModel, account_site, cumulative_seconds, totals
from curtail.planning.policy import SiteState
from curtail.planning.windows import CurtailmentCalendar

POWER = PowerModel(training_w=2024.0, idle_w=468.0)


def account(values, intervals, *, threshold=100.0, span=None):
    signal = make_signal(values)
    calendar = CurtailmentCalendar({"s": signal}, CurtailmentRules(threshold_g_per_kwh=threshold))
    rows = [Interval("s", state, T0_S + a, T0_S + b) for state, a, b in intervals]
    span = span or (signal.start_s, signal.end_s)
    return account_site(rows, POWER, signal, calendar.curtailed("s"), span)


def test_one_hour_at_2024_w_and_100_g_per_kwh():
    result = account([100.0] * 24, [(SiteState.TRAINING, 0, 3600)])
    assert result.energy_kwh == pytest.approx(2.024, rel=1e-12)
    assert result.emissions_kg == pytest.approx(0.2024, rel=1e-12)
    assert result.training_s == 3600 and result.provisioned_idle_s == 0
    assert result.energy_in_windows_kwh == 0 and result.curtailed_s == 0  # 100 is not below 100
    inside = account([100.0] * 24, [(SiteState.TRAINING, 0, 3600)], threshold=150)
    assert inside.energy_in_windows_kwh == pytest.approx(2.024, rel=1e-12)
    assert inside.curtailed_s == 7200 and inside.training_in_windows_s == 3600


def test_interval_split_across_two_samples():
    # [200, 500) s: 100 s at 100 g/kWh, then 200 s at 300 g/kWh
    result = account([100.0, 300.0, 500.0], [(SiteState.TRAINING, 200, 500)])
    assert result.energy_kwh == pytest.approx(2024 * 300 / 3.6e6, rel=1e-12)
    assert result.emissions_kg == pytest.approx(2024 * (100 * 100 + 300 * 200) / 3.6e9, rel=1e-12)
    assert result.emissions_kg == pytest.approx(0.0393555555, rel=1e-8)


def test_in_window_share_with_a_crossing_signal():
    values = [50.0, 50.0, 200.0, 200.0]  # below the threshold for [0, 600), above for [600, 1200)
    intervals = [
        (SiteState.PROVISIONING, 0, 240),
        (SiteState.WAITING, 240, 300),
        (SiteState.TRAINING, 300, 900),
    ]
    result = account(values, intervals)
    idle_j, training_j = 468 * 300, 2024 * 600
    assert result.energy_kwh == pytest.approx((idle_j + training_j) / 3.6e6, rel=1e-12)
    assert result.energy_in_windows_kwh == pytest.approx((idle_j + 2024 * 300) / 3.6e6, rel=1e-12)
    assert result.emissions_kg == pytest.approx(
        (idle_j * 50 + 2024 * (300 * 50 + 300 * 200)) / 3.6e9, rel=1e-12
    )
    assert (result.training_s, result.provisioned_idle_s, result.training_in_windows_s) == (
        600,
        300,
        300,
    )
    assert result.curtailed_s == 600
    summary = totals({"s": result, "off": account(values, [])})
    assert summary["energy_kwh"] == pytest.approx(result.energy_kwh)
    assert summary["share_energy_in_windows"] == pytest.approx(
        (468 * 300 + 2024 * 300) / (468 * 300 + 2024 * 600)
    )
    assert summary["window_utilisation"] == pytest.approx(
        300 / 1200
    )  # both sites' 600 curtailed seconds count


def test_off_and_empty_intervals_draw_nothing():
    result = account([50.0] * 4, [(SiteState.OFF, 0, 600), (SiteState.TRAINING, 600, 600)])
    assert (result.energy_kwh, result.emissions_kg, result.training_s) == (0, 0, 0)
    assert totals({"s": result}) == {
        "energy_kwh": 0.0,
        "emissions_kg": 0.0,
        "share_energy_in_windows": 0.0,
        "window_utilisation": 0.0,
    }


def test_power_model_per_state():
    site = SiteConfig(
        region="R",
        num_gpus=4,
        training_power_per_gpu_w=506,
        idle_power_per_gpu_w=117,
        tokens_per_s=1,
    )
    power = PowerModel.of_site(site)
    assert power == PowerModel(2024, 468)
    assert power.power_w(SiteState.TRAINING) == 2024 and power.power_w(SiteState.OFF) == 0
    for state in (SiteState.PROVISIONING, SiteState.STARTING, SiteState.WAITING, SiteState.SYNCING):
        assert power.power_w(state) == 468
    assert (TRAINING_W, IDLE_W) == (2024, 468)


def test_cumulative_seconds():
    intervals = [
        Interval("s", SiteState.TRAINING, 30, 50),
        Interval("s", SiteState.TRAINING, 10, 20),
    ]
    query = np.array([0, 10, 15, 20, 25, 30, 40, 50, 60], dtype=float)
    np.testing.assert_allclose(
        cumulative_seconds(intervals, query), [0, 0, 5, 10, 10, 10, 20, 30, 30]
    )
    adjacent = [Interval("s", SiteState.TRAINING, 0, 10), Interval("s", SiteState.SYNCING, 10, 20)]
    np.testing.assert_allclose(
        cumulative_seconds(adjacent, np.array([5.0, 10, 15, 25])), [5, 10, 15, 20]
    )
    np.testing.assert_array_equal(cumulative_seconds([], np.array([1.0, 2.0])), [0, 0])
    empty = [Interval("s", SiteState.TRAINING, 5, 5)]
    np.testing.assert_array_equal(cumulative_seconds(empty, np.array([1.0, 9.0])), [0, 0])


@st.composite
def intervals_on_a_signal(draw):
    values = draw(st.lists(st.integers(0, 900), min_size=1, max_size=12))
    end = 300 * len(values)
    cuts = sorted(set(draw(st.lists(st.integers(0, end), min_size=2, max_size=10))))
    states = draw(
        st.lists(st.sampled_from(list(SiteState)), min_size=len(cuts), max_size=len(cuts))
    )
    return [float(v) for v in values], [
        (states[i], cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)
    ]


@settings(max_examples=100, deadline=None)
@given(case=intervals_on_a_signal())
def test_integrals_match_second_by_second_sums(case):
    values, intervals = case
    result = account(values, intervals)
    per_second_ci = np.repeat(values, 300)  # the signal, one value per second
    curtailed = per_second_ci < 100
    energy_ws = emissions = in_windows_ws = 0.0
    for state, a, b in intervals:
        watts = POWER.power_w(state)
        energy_ws += watts * (b - a)
        emissions += watts * per_second_ci[a:b].sum() / 3.6e9
        in_windows_ws += watts * curtailed[a:b].sum()
    assert result.energy_kwh == pytest.approx(energy_ws / 3.6e6, rel=1e-9, abs=1e-12)
    assert result.emissions_kg == pytest.approx(emissions, rel=1e-9, abs=1e-12)
    assert result.energy_in_windows_kwh == pytest.approx(in_windows_ws / 3.6e6, rel=1e-9, abs=1e-12)
    assert result.curtailed_s == curtailed.sum()
    share = totals({"s": result})["share_energy_in_windows"]
    assert 0.0 <= share <= 1.0 + 1e-12
