"""The forecast-aware and budget-aware policies on hand-made traces with known best decisions,
curtailment for average-CI traces (a causal percentile threshold), and the paper comparison."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_fixtures import (
    IDLE_W,
    RATE,
    REPO,
    T0_S,
    TRAINING_W,
    make_context,
    make_signal,
    pattern,
    seconds_in,
    summary_of,
)

from curtail.api import simulate as simulate_experiment
from curtail.config import (
    POLICY_CONFIGS,
    POLICY_KINDS,
    BudgetPolicyConfig,
    CurtailmentRules,
    ExecutionConfig,
    ForecastParams,
    ForecastPolicyConfig,
    load_experiment,
)
from curtail.planning.budget import BudgetPolicy
from curtail.planning.forecast import (
    RECORDED_HORIZON_S,
    WATTTIME_CAISO_2023_06,
    synthesize_forecast,
)
from curtail.planning.forecast_policy import ForecastAwarePolicy
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.policy import SiteState, make_policy, registered_policies
from curtail.planning.simulator import Simulator
from curtail.planning.windows import (
    CurtailmentCalendar,
    compute_windows,
    compute_windows_stepwise,
    curtailment_thresholds,
)

STARTUP_S = 240 + 30  # default provisioning + group start


def run(context, kind: str, **params):
    trajectory = Simulator(context, make_policy(POLICY_CONFIGS[kind](**params), context)).run()
    return trajectory, summary_of(context, trajectory, kind)


def with_perfect_forecasts(context):
    """The context with forecasts that are exactly the truth (65 min ahead, every 5 min)."""
    perfect = WATTTIME_CAISO_2023_06.scaled(0.0)
    forecasts = {site: synthesize_forecast(s, model=perfect) for site, s in context.signals.items()}
    return dataclasses.replace(context, forecasts=forecasts)


def training(trajectory, site: str = "a") -> list[tuple[float, float]]:
    return [
        (i.start_s - T0_S, i.end_s - T0_S)
        for i in trajectory.intervals_of(site)
        if i.state is SiteState.TRAINING
    ]


def provisions(trajectory, site: str = "a") -> list[float]:
    return [e.t_s - T0_S for e in trajectory.events if e.site == site and e.event == "provision"]


def test_every_policy_kind_is_known_and_built_from_its_config():
    assert set(registered_policies()) == set(POLICY_KINDS) == {"threshold", "always_on", "forecast", "budget", "mpc", "oracle"}
    context = make_context({"a": pattern("LLHH")})
    for config in (ForecastPolicyConfig(bridge_s=60), BudgetPolicyConfig(max_ci_g_per_kwh=20)):
        policy = make_policy(config, context)
        assert policy.kind == config.kind and policy.config is config
    # left out, a policy's config is its model's defaults: the defaults live in curtail.config only
    assert BudgetPolicy(context).config == BudgetPolicyConfig()
    assert BudgetPolicyConfig().hold_s == 0 and ForecastPolicyConfig().hold_s == 600
    assert ForecastParams.model_fields["forecast_horizon_s"].default == RECORDED_HORIZON_S
    with pytest.raises(TypeError, match="config of 'budget'"):
        ForecastAwarePolicy(context, BudgetPolicyConfig())


# ------------------------------------------------------------------------------- forecast-aware

WINDOW = pattern("H" * 6 + "L" * 6 + "H" * 6)  # curtailed 30 .. 60 min, the trace ends at 90 min


def test_forecast_pre_provisions_so_the_site_is_ready_as_the_window_opens():
    context = with_perfect_forecasts(make_context({"a": WINDOW}))
    trajectory, summary = run(context, "forecast", forecast="recorded", hold_s=0)
    assert provisions(trajectory) == [1800 - STARTUP_S]
    assert training(trajectory) == [(1800, 3600)]  # all of the window, nothing outside
    assert summary["window_utilisation"] == pytest.approx(1.0)
    inside_kwh = TRAINING_W * 1800 / 3.6e6
    outside_kwh = IDLE_W * STARTUP_S / 3.6e6  # the pre-provisioning itself
    assert summary["share_energy_in_windows"] == pytest.approx(
        inside_kwh / (inside_kwh + outside_kwh)
    )
    # the threshold policy loses the start-up inside the window and trains through the countdown
    threshold, threshold_summary = run(context, "threshold")
    assert training(threshold) == [(1800 + STARTUP_S, 3600 + 600)]
    assert threshold_summary["window_utilisation"] == pytest.approx((1800 - STARTUP_S) / 1800)


def test_forecast_skips_a_window_too_short_to_pay_back_the_start_up():
    trace = pattern(
        "H" * 4 + "L" + "H" * 7 + "L" * 8 + "H" * 2
    )  # 5 min at 20 min, 40 min at 60 min
    context = with_perfect_forecasts(make_context({"a": trace}))
    trajectory, _ = run(context, "forecast", forecast="recorded", min_window_s=600)
    assert provisions(trajectory) == [3600 - STARTUP_S]
    assert training(trajectory) == [(3600, 6000)]
    eager, _ = run(context, "forecast", forecast="recorded", min_window_s=0)
    assert provisions(eager)[0] == 1200 - STARTUP_S  # without the rule it pays for 5 minutes


def test_forecast_idles_through_a_short_gap_instead_of_flapping():
    trace = pattern("L" * 6 + "H" + "L" * 6 + "H" * 6)  # a 5-minute gap at 30 min
    context = with_perfect_forecasts(make_context({"a": trace}))
    trajectory, summary = run(context, "forecast", forecast="recorded", bridge_s=1800, hold_s=0)
    assert provisions(trajectory) == [0]
    assert training(trajectory) == [(STARTUP_S, 1800), (2100, 3900)]  # nothing above the threshold
    assert seconds_in(trajectory, "a", SiteState.WAITING) == 300
    assert summary["window_utilisation"] == pytest.approx((3600 - STARTUP_S) / 3600)
    flapping, _ = run(context, "forecast", forecast="recorded", bridge_s=0, hold_s=0)
    assert provisions(flapping) == [0, 2100 - STARTUP_S]  # released, then pre-provisioned again


def test_forecast_falls_back_cleanly_without_forecasts():
    context = make_context({"a": WINDOW})  # no recorded forecasts
    trajectory, _ = run(context, "forecast", forecast="recorded", hold_s=600)
    assert provisions(trajectory) == [1800]  # cannot foresee the opening
    assert training(trajectory) == [(1800 + STARTUP_S, 3600)]  # stops at once when it rises
    assert seconds_in(trajectory, "a", SiteState.WAITING) == 600  # keeps the nodes for hold_s
    none, _ = run(with_perfect_forecasts(context), "forecast", forecast="none", hold_s=600)
    assert training(none) == training(trajectory)


def test_forecast_reads_synthetic_forecasts_when_none_are_recorded():
    context = make_context({"a": WINDOW})
    policy = make_policy(ForecastPolicyConfig(forecast="auto", forecast_seed=4), context)
    assert policy.forecasts["a"] is not None and policy.forecasts["a"].source.startswith(
        "synthetic"
    )
    again = make_policy(ForecastPolicyConfig(forecast="auto", forecast_seed=4), context)
    assert np.array_equal(policy.forecasts["a"].ci_g_per_kwh, again.forecasts["a"].ci_g_per_kwh)


@pytest.fixture(scope="module")
def paper_plan():
    experiment = load_experiment(REPO / "experiments/paper_policies.toml")
    traces, forecasts = load_experiment_traces(experiment)

    def plan(policy):
        run = experiment.run("budget").model_copy(update={"policy": policy})
        return plan_run(experiment, run, traces, forecasts)

    return plan


def forecast_errors(policy) -> np.ndarray:
    """Every synthetic forecast's error (gCO2/kWh), all sites, at every lead."""
    errors = []
    for site, forecast in policy.forecasts.items():
        truth = policy.context.signals[site].step.value_at(forecast.target_s)
        errors.append(forecast.ci_g_per_kwh - truth)
    return np.concatenate(errors)


def test_the_forecast_error_scale_scales_synthetic_forecast_errors_on_the_paper_trace(paper_plan):
    def errors(scale: float) -> np.ndarray:
        config = BudgetPolicyConfig(max_ci_g_per_kwh=75, forecast="synthetic", forecast_error_scale=scale)
        return forecast_errors(paper_plan(config).policy)

    calibrated, perfect, doubled = errors(1.0), errors(0.0), errors(2.0)
    assert np.all(perfect == 0)  # scale 0: the truth over the horizon
    assert np.array_equal(calibrated, forecast_errors(paper_plan(BudgetPolicyConfig(forecast="synthetic")).policy))
    assert 0 < np.mean(np.abs(calibrated)) < np.mean(np.abs(doubled))
    assert len(perfect) == len(calibrated) > 0


# ------------------------------------------------------------------------------- budget-aware

HOUR = 12  # samples


def test_budget_spends_the_budget_in_the_cleanest_window():
    """a is curtailed at 80 g first, b at 10 g later: the budget fits in b's window."""
    context = make_context(
        {
            "a": [80.0] * HOUR + [400.0] * 2 * HOUR,
            "b": [400.0] * (HOUR + HOUR // 2) + [10.0] * HOUR + [400.0] * (HOUR // 2),
        },
        token_budget=RATE * 3000,
    )
    trajectory, summary = run(context, "budget", max_ci_g_per_kwh=50, forecast="none")
    assert trajectory.completed and trajectory.tokens_by_site["a"] == 0
    assert training(trajectory, "b") == [(5400 + STARTUP_S, 5400 + STARTUP_S + 3000)]
    expected_kg = (TRAINING_W * 3000 + IDLE_W * STARTUP_S) * 10.0 / 3.6e9
    assert summary["emissions_kg"] == pytest.approx(expected_kg)
    _, threshold = run(context, "threshold")
    assert threshold["emissions_kg"] > 5 * summary["emissions_kg"]  # it trains in a's 80 g window


def test_budget_deadline_guard_completes_a_budget_the_clean_windows_cannot_hold():
    context = make_context(
        {
            "a": [80.0] * HOUR + [400.0] * 2 * HOUR,
            "b": [400.0] * (HOUR + HOUR // 2) + [10.0] * (HOUR // 2) + [400.0] * HOUR,
        },
        token_budget=RATE * 3000,
    )
    trajectory, _ = run(context, "budget", max_ci_g_per_kwh=50, forecast="none")
    assert trajectory.completed and trajectory.finish_s <= context.deadline_s
    clean_s = 1800 - STARTUP_S  # b's window after start-up
    assert trajectory.tokens_by_site["b"] >= RATE * clean_s
    # the rest was trained at the very end, by every site
    late = [
        i for i in trajectory.intervals if i.state is SiteState.TRAINING and i.start_s > T0_S + 7200
    ]
    assert {i.site for i in late} == {"a", "b"}
    unguarded, _ = run(
        context, "budget", max_ci_g_per_kwh=50, forecast="none", deadline_guard=False
    )
    assert not unguarded.completed and unguarded.tokens == pytest.approx(RATE * clean_s)


def test_budget_prices_carbon_per_token_so_a_slower_site_must_be_cleaner():
    context = make_context(
        {"fast": [40.0] * HOUR, "slow": [40.0] * HOUR},
        rates={"slow": RATE / 2},
        token_budget=RATE * 1200,
    )
    trajectory, _ = run(context, "budget", max_ci_g_per_kwh=60, forecast="none")
    assert (
        trajectory.completed and trajectory.tokens_by_site["slow"] == 0
    )  # 40 g costs it like 80 g
    both, _ = run(context, "budget", max_ci_g_per_kwh=90, forecast="none")
    assert both.tokens_by_site["slow"] > 0


def test_budget_pacing_relaxes_the_price_when_behind():
    context = make_context({"a": [80.0] * HOUR + [10.0] * HOUR}, token_budget=RATE * 3000)
    patient, _ = run(context, "budget", max_ci_g_per_kwh=50, forecast="none")
    assert training(patient)[0][0] >= 3600  # waits for the 10 g hour
    paced, _ = run(context, "budget", max_ci_g_per_kwh=50, forecast="none", pace_fraction=1.0)
    assert training(paced)[0][0] < 3600  # behind a linear schedule: trains at 80 g


# ------------------------------------------------------------------------------- average-CI traces

PERCENTILE = CurtailmentRules(
    threshold_kind="percentile", threshold_percentile=60, percentile_window_s=3600
)


def test_percentile_threshold_by_hand():
    signal = make_signal([40.0, 10.0, 30.0, 20.0, 50.0])
    rules = CurtailmentRules(
        threshold_kind="percentile", threshold_percentile=50, percentile_window_s=900
    )
    # median of the samples in (t - 15 min, t]: [40], [40, 10], [40, 10, 30], [10, 30, 20], [30, 20, 50]
    assert curtailment_thresholds(signal, rules) == pytest.approx([40, 25, 30, 20, 30])
    calendar = CurtailmentCalendar({"a": signal}, rules)
    curtailed = calendar.curtailed("a").values
    assert list(curtailed) == [0, 1, 0, 0, 0]
    assert calendar.threshold_at("a", signal.times_s[3] + 10) == 20


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(0, 800), min_size=2, max_size=60),
    percentile=st.floats(1, 99),
    window_samples=st.integers(1, 30),
    cut=st.integers(1, 59),
)
def test_percentile_threshold_is_the_trailing_percentile_and_causal(
    values, percentile, window_samples, cut
):
    rules = CurtailmentRules(
        threshold_kind="percentile",
        threshold_percentile=percentile,
        percentile_window_s=300.0 * window_samples,
    )
    thresholds = curtailment_thresholds(make_signal(values), rules)
    for i in range(len(values)):
        trailing = values[max(0, i - window_samples + 1) : i + 1]
        assert thresholds[i] == pytest.approx(np.percentile(trailing, percentile), abs=1e-6)
    cut = min(cut, len(values) - 1)
    changed = values[:cut] + [800.0 - v for v in values[cut:]]
    assert np.array_equal(
        curtailment_thresholds(make_signal(changed), rules)[:cut], thresholds[:cut]
    )
    signal = make_signal(values)
    assert compute_windows("s", signal, rules) == compute_windows_stepwise("s", signal, rules)


def test_percentile_curtailment_on_the_german_year():
    from curtail.config import TraceSource
    from curtail.planning.traces import load_trace

    signal = load_trace(
        TraceSource(
            path=REPO / "data/traces/avg_ci_2020_germany.csv",
            signal="average",
            naive_timezone="UTC",
            columns={"Carbon Intensity": "DE"},
        )
    ).signals["DE"]
    rules = CurtailmentRules(threshold_kind="percentile", threshold_percentile=20)
    calendar = CurtailmentCalendar({"de": signal}, rules)
    share = calendar.curtailed_seconds("de", signal.start_s, signal.end_s) / (
        signal.end_s - signal.start_s
    )
    assert 0.15 < share < 0.3  # about the percentile: "the cleanest fifth of the past week"
    assert len(calendar.windows("de")) > 100


# ------------------------------------------------------------------------------- the paper comparison


@pytest.fixture(scope="module")
def paper_policies():
    return simulate_experiment(REPO / "experiments/paper_policies.toml", write=False)


def test_paper_policies_meet_the_issue_targets(paper_policies):
    rows = pd.DataFrame(paper_policies.summaries).set_index("run")
    assert rows["completed"].all()
    policies = rows[rows["policy"] != "oracle"]
    best = policies["emissions_kg"].idxmin()
    assert rows.loc[best, "emissions_kg"] <= 0.5  # prior system: 1.38 kg
    assert rows.loc[best, "share_energy_in_windows"] >= 0.995
    oracle = rows[rows["policy"] == "oracle"].iloc[0]
    assert oracle["emissions_kg"] <= policies["emissions_kg"].min()
    assert rows.loc["forecast", "window_utilisation"] >= rows.loc["threshold", "window_utilisation"]


def test_every_experiment_policy_config_builds(paper_policies):
    experiment = load_experiment(REPO / "experiments/paper_policies.toml")
    assert {run.policy.kind for run in experiment.runs} == {
        "threshold",
        "forecast",
        "budget",
        "oracle",
    }
    assert [s["policy"] for s in paper_policies.summaries] == [
        r.policy.kind for r in experiment.runs
    ]


def test_budget_policy_runs_on_a_percentile_calendar():
    values = np.tile(np.concatenate([np.full(6, 300.0), np.full(6, 150.0)]), 8)
    context = make_context(
        {"a": make_signal(values)},
        rules=PERCENTILE,
        execution=ExecutionConfig(),
        token_budget=RATE * 3600,
    )
    trajectory, summary = run(context, "budget", max_ci_g_per_kwh=1000)
    assert trajectory.completed and summary["share_energy_in_windows"] > 0.9
