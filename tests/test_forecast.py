"""Honest forecasts: the error model calibrated on WattTime's recorded CAISO forecasts, synthetic
forecasts made with it (seeded, causal, errors growing with lead time), and the policy's view."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_fixtures import TRACES, make_context, make_signal

from curtail.config import ForecastSource, TraceSource
from curtail.planning.forecast import (
    RECORDED_HORIZON_S,
    WATTTIME_CAISO_2023_06,
    Outlook,
    PowerLaw,
    calibrate_error_model,
    foresight,
    noise_seed,
    outlook_of,
    synthesize_forecast,
)
from curtail.planning.forecast_policy import site_forecasts
from curtail.planning.traces import Forecast, load_forecast, load_trace


@pytest.fixture(scope="module")
def caiso_month():
    actual = load_trace(
        TraceSource(
            path=TRACES / "watttime_moer_2023-06_caiso-north_actual.csv", naive_timezone="UTC"
        )
    ).signals["Caiso_North"]
    recorded = load_forecast(
        ForecastSource(
            path=TRACES / "watttime_moer_2023-06_caiso-north_forecast.csv.gz",
            region="Caiso_North",
            naive_timezone="UTC",
        )
    )
    return actual, recorded


def _laws(model):
    """Every fitted number of a model, by name (for comparisons)."""
    numbers = {}
    for regime in ("below", "above"):
        errors = getattr(model, regime)
        for field in dataclasses.fields(errors):
            value = getattr(errors, field.name)
            if isinstance(value, PowerLaw):
                numbers[f"{regime}.{field.name}.at_1h"] = value.at_1h
                numbers[f"{regime}.{field.name}.exponent"] = value.exponent
            else:
                numbers[f"{regime}.{field.name}"] = value
    for name in ("other_level_ratio_below", "other_level_ratio_above", "rho_revision", "rho_lead"):
        numbers[name] = getattr(model, name)
    return numbers


# ------------------------------------------------------------------------------- calibration


def test_the_stored_model_is_the_calibration_of_the_recorded_forecasts(caiso_month):
    actual, recorded = caiso_month
    fitted = calibrate_error_model(actual, recorded)
    stored = _laws(WATTTIME_CAISO_2023_06)
    for name, value in _laws(fitted).items():
        assert value == pytest.approx(stored[name], rel=2e-3, abs=1e-6), name
    assert fitted.calibrated_leads_s == WATTTIME_CAISO_2023_06.calibrated_leads_s == (300.0, 3900.0)


def test_recorded_forecasts_miss_openings_and_errors_grow_with_lead():
    model = WATTTIME_CAISO_2023_06
    five_min, one_hour = 300.0, 3600.0
    # an opening window (target curtailed, site was not at issue) is almost never foreseen
    assert model.flip_probability(one_hour, below=True, changed=True) > 0.9
    # curtailment that holds is mis-forecast less often, more often with lead
    assert (
        0.1
        < model.flip_probability(five_min, True, False)
        < model.flip_probability(one_hour, True, False)
        < 0.5
    )
    # a window that is not there is rarely invented
    assert model.flip_probability(one_hour, below=False, changed=False) < 0.01
    for regime in (model.below, model.above):
        assert regime.spread_g_per_kwh(one_hour) > regime.spread_g_per_kwh(five_min) > 0


def test_power_law_fit_recovers_a_power_law():
    leads = np.arange(300.0, 4000.0, 300.0)
    law = PowerLaw.fit(leads, -12.5 * (leads / 3600.0) ** 0.3)
    assert law.at_1h == pytest.approx(-12.5) and law.exponent == pytest.approx(0.3)


# ------------------------------------------------------------------------------- synthesis


def test_synthetic_forecasts_reproduce_the_recorded_error_statistics(caiso_month):
    """Calibrating on synthetic forecasts of the same month gives back the model (statistically)."""
    actual, _ = caiso_month
    refitted = calibrate_error_model(actual, synthesize_forecast(actual, seed=3))
    model = WATTTIME_CAISO_2023_06
    for lead in (300.0, 1800.0, 3600.0):
        for below in (True, False):
            for changed in (True, False):
                assert refitted.flip_probability(lead, below, changed) == pytest.approx(
                    model.flip_probability(lead, below, changed), abs=0.08
                ), (lead, below, changed)
        for regime in ("below", "above"):
            fitted, stored = getattr(refitted, regime), getattr(model, regime)
            assert fitted.spread_g_per_kwh(lead) == pytest.approx(
                stored.spread_g_per_kwh(lead), rel=0.15
            )
            assert fitted.bias_g_per_kwh(lead) == pytest.approx(
                stored.bias_g_per_kwh(lead), rel=0.15
            )


def test_synthetic_forecast_shape_and_seed():
    signal = make_signal(np.linspace(20, 400, 48))
    forecast = synthesize_forecast(signal, seed=1)
    # one forecast per sample (the last sample has no future inside the trace)
    assert np.array_equal(forecast.request_s, signal.times_s[:-1])
    targets, values = forecast.latest(signal.times_s[0])
    assert np.allclose(targets - signal.times_s[0], 300.0 * np.arange(1, 14))  # 5..65 min ahead
    assert np.all(values >= 0)
    again = synthesize_forecast(signal, seed=1)
    other = synthesize_forecast(signal, seed=2)
    assert np.array_equal(forecast.ci_g_per_kwh, again.ci_g_per_kwh)
    assert not np.array_equal(forecast.ci_g_per_kwh, other.ci_g_per_kwh)
    # no target beyond the trace
    assert forecast.target_s.max() < signal.end_s


def test_a_perfect_error_model_forecasts_the_truth():
    signal = make_signal([400, 400, 50, 50, 400, 30, 30, 30, 400, 400])
    forecast = synthesize_forecast(signal, model=WATTTIME_CAISO_2023_06.scaled(0.0), seed=0)
    assert np.allclose(forecast.ci_g_per_kwh, signal.step.value_at(forecast.target_s))


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(0, 900), min_size=30, max_size=60),
    cut=st.integers(5, 25),
    seed=st.integers(0, 1000),
)
def test_synthetic_forecasts_are_causal(values, cut, seed):
    """Changing the signal after t + horizon changes no forecast issued at or before t."""
    signal = make_signal(values)
    changed = list(values)
    reach = cut + int(RECORDED_HORIZON_S // 300) + 1
    changed[reach:] = [900.0 - v for v in changed[reach:]]
    before = synthesize_forecast(signal, seed=seed)
    after = synthesize_forecast(make_signal(changed), seed=seed)
    issued_by = signal.times_s[cut]
    for request in before.request_s[before.request_s <= issued_by]:
        targets_a, values_a = before.latest(request)
        targets_b, values_b = after.latest(request)
        assert np.array_equal(targets_a, targets_b) and np.array_equal(values_a, values_b)


def test_mean_error_grows_with_lead_time(caiso_month):
    actual, _ = caiso_month
    forecast = synthesize_forecast(actual, seed=0)
    lead = forecast.target_s - np.repeat(forecast.request_s, np.diff(forecast.offsets))
    error = np.abs(forecast.ci_g_per_kwh - actual.step.value_at(forecast.target_s))
    short, long = error[np.isclose(lead, 300)].mean(), error[np.isclose(lead, 3600)].mean()
    assert long > 1.5 * short


def test_a_sites_synthetic_forecast_depends_on_its_name_not_its_order():
    """Reordering, adding or removing sites leaves every other site's forecast unchanged; two
    sites on the same trace get different noise (their names differ)."""
    trace = list(np.linspace(20.0, 400.0, 24)) + list(np.linspace(400.0, 20.0, 24))
    other = [400.0 - v for v in trace]

    def forecasts(traces: dict) -> dict:
        made = site_forecasts(make_context(traces), "synthetic", seed=7, horizon_s=RECORDED_HORIZON_S)
        return {site: forecast.ci_g_per_kwh for site, forecast in made.items()}

    ab = forecasts({"alpha": trace, "beta": other})
    ba = forecasts({"beta": other, "alpha": trace})
    alone = forecasts({"beta": other})
    crowd = forecasts({"gamma": trace, "beta": other, "alpha": trace})
    assert np.array_equal(ab["alpha"], ba["alpha"]) and np.array_equal(ab["beta"], ba["beta"])
    assert np.array_equal(alone["beta"], ab["beta"]) and np.array_equal(crowd["beta"], ab["beta"])
    assert np.array_equal(crowd["alpha"], ab["alpha"])
    assert not np.array_equal(crowd["gamma"], crowd["alpha"])  # same trace, another name
    seeded = site_forecasts(make_context({"alpha": trace}), "synthetic", seed=8, horizon_s=RECORDED_HORIZON_S)
    assert not np.array_equal(seeded["alpha"].ci_g_per_kwh, ab["alpha"])  # the run's seed still counts


def test_the_noise_seed_is_a_stable_hash_of_the_name():
    assert noise_seed(0, "caiso_north") == [0, 3567636198]  # CRC-32: the same in every process
    assert noise_seed(3, "a") != noise_seed(3, "b") and noise_seed(3, "a") != noise_seed(4, "a")
    assert noise_seed(-1, "a")[0] == 2**64 - 1  # negative run seeds are valid entropy too
    signal = make_signal(np.linspace(20, 400, 48), region="R")
    named = synthesize_forecast(signal, seed=5, site="alpha")
    assert np.array_equal(named.ci_g_per_kwh, synthesize_forecast(signal, seed=5, site="alpha").ci_g_per_kwh)
    assert "site=alpha" in named.source


# ------------------------------------------------------------------------------- foresight

HOUR = 12  # five-minute samples


def issued_every_step(signal, leads: int, values) -> Forecast:
    requests = signal.times_s
    targets = (requests[:, None] + 300.0 * np.arange(1, leads + 1)[None, :]).ravel()
    return Forecast(signal.region, requests, np.arange(len(requests) + 1) * leads, targets, values(requests, targets))


def persistence(signal, leads: int) -> Forecast:
    """Forecasts that repeat the value at issue for every target (what WattTime's mostly do)."""
    return issued_every_step(signal, leads, lambda requests, _: np.repeat(signal.ci_g_per_kwh, leads))


def late_by(signal, leads: int, delay_s: float) -> Forecast:
    """Forecasts that see every change coming, ``delay_s`` late."""
    return issued_every_step(signal, leads, lambda _, targets: signal.step.value_at(targets - delay_s))


def test_foresight_by_hand():
    """Two windows: one opening after 3 h above (new at a 1 h lead), one 30 min after the first
    closed (a reopening); the first is open 2 h, so its closing counts at 1 h; the second only
    45 min, so at issue of the forecast an hour before its closing there was no window."""
    values = [400.0] * (3 * HOUR) + [50.0] * (2 * HOUR) + [400.0] * 6 + [50.0] * 9 + [400.0] * (2 * HOUR)
    signal = make_signal(values)
    perfect = synthesize_forecast(signal, model=WATTTIME_CAISO_2023_06.scaled(0.0), horizon_s=3 * 3600.0)
    seen = foresight(signal, perfect, threshold_g_per_kwh=100, lead_s=3600)
    assert (seen.new_openings, seen.new_openings_foreseen) == (1, 1)
    assert (seen.reopenings, seen.reopenings_foreseen) == (1, 1)
    assert (seen.closings, seen.closings_foreseen) == (1, 1)
    assert seen.false_alarm_rate == 0 and seen.open_miss_rate == 0
    blind = foresight(signal, persistence(signal, 36), threshold_g_per_kwh=100, lead_s=3600)
    assert (blind.new_openings_foreseen, blind.closings_foreseen) == (0, 0)
    assert blind.reopenings_foreseen == 1  # issued inside the first window: persistence says "open"
    assert blind.false_alarm_rate == 0 and blind.open_miss_rate == 0
    late = late_by(signal, 36, 600.0)  # 10 min late: missed exactly, foreseen within 15 min
    strict = foresight(signal, late, threshold_g_per_kwh=100, lead_s=3600)
    near = foresight(signal, late, threshold_g_per_kwh=100, lead_s=3600, tolerance_s=900)
    assert (strict.new_openings_foreseen, strict.closings_foreseen) == (0, 0)
    assert (near.new_openings_foreseen, near.closings_foreseen) == (1, 1)
    # a forecast too short for the lead, or issued after the crossing minus the lead, counts nothing
    short = foresight(signal, persistence(signal, 6), threshold_g_per_kwh=100, lead_s=3600)
    assert short.new_openings == short.reopenings == short.closings == 0


def test_foresight_of_the_recorded_caiso_month_at_100_g(caiso_month):
    """WattTime's CAISO forecasts foresee none of the new openings an hour ahead."""
    actual, recorded = caiso_month
    seen = foresight(actual, recorded, threshold_g_per_kwh=100, lead_s=3600)
    assert seen.new_openings > 30 and seen.new_openings_foreseen == 0
    assert seen.false_alarm_rate < 0.01


# ------------------------------------------------------------------------------- the policy's view


def test_outlook_sees_only_targets_after_now_of_the_newest_forecast():
    signal = make_signal([400] * 4 + [50] * 4 + [400] * 8)
    forecast = synthesize_forecast(signal, model=WATTTIME_CAISO_2023_06.scaled(0.0))
    now = signal.times_s[1] + 100.0  # between issues: the forecast issued at times_s[1] holds
    outlook = outlook_of(forecast, now, 300.0)
    assert outlook.targets_s[0] == signal.times_s[2] and np.all(outlook.targets_s > now)
    assert outlook.runs_below(100.0) == [(signal.times_s[4], signal.times_s[8])]
    assert outlook.first_at_or_above(100.0) == signal.times_s[2]
    assert outlook_of(forecast, signal.times_s[0] - 1.0, 300.0) is None  # nothing issued yet
    assert outlook_of(None, now, 300.0) is None


def test_a_run_reaching_the_horizon_has_an_unknown_end():
    outlook = Outlook(0.0, np.array([300.0, 600.0, 900.0]), np.array([400.0, 50.0, 40.0]), 300.0)
    assert outlook.runs_below(100.0) == [(600.0, math.inf)]
    assert outlook.horizon_end_s == 1200.0
    assert outlook.first_at_or_above(500.0) == math.inf
