"""The model-predictive-control policy (``kind = "mpc"``): its estimate of the future (forecast,
past-day scenarios, nothing where there is no past) by hand, the plan it prices, idling that
must pay, and the paper trace: budget, windows, goodput, information and the threshold policy.

``-s`` prints the paper-trace comparison (docs/POLICIES.md quotes it).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tomllib

import numpy as np
import pytest
from planning_fixtures import (
    RATE,
    REPO,
    STEP_S,
    T0_S,
    make_context,
    make_signal,
    pattern,
    seconds_in,
    summary_of,
)

from curtail.api import simulate
from curtail.config import (
    POLICY_KINDS,
    ConfigError,
    MpcPolicyConfig,
    load_experiment,
    parse_experiment,
)
from curtail.planning.forecast import WATTTIME_CAISO_2023_06, synthesize_forecast
from curtail.planning.mpc_policy import MpcPolicy
from curtail.planning.oracle import emissions_lower_bound_kg
from curtail.planning.policy import Observation, SiteState, make_policy, registered_policies
from curtail.planning.simulator import Simulator

HOUR_S = 3600.0
DAY_S = 86400.0
STARTUP_S = 240 + 30  # default provisioning + group start
PAPER_MPC = REPO / "experiments" / "paper_mpc.toml"
SEEDS = range(10)


def observe(context, now_s: float, tokens_trained: float = 0.0) -> Observation:
    return Observation(now_s, dict.fromkeys(context.sites, SiteState.OFF), tokens_trained, context.token_budget)


def run(context, **params):
    trajectory = Simulator(context, make_policy(MpcPolicyConfig(**params), context)).run()
    return trajectory, summary_of(context, trajectory, "mpc")


def with_perfect_forecasts(context, horizon_s: float):
    perfect = WATTTIME_CAISO_2023_06.scaled(0.0)
    forecasts = {
        site: synthesize_forecast(s, model=perfect, horizon_s=horizon_s) for site, s in context.signals.items()
    }
    return dataclasses.replace(context, forecasts=forecasts)


def training(trajectory, site: str = "a") -> list[tuple[float, float]]:
    return [
        (i.start_s - T0_S, i.end_s - T0_S) for i in trajectory.intervals_of(site) if i.state is SiteState.TRAINING
    ]


def provisions(trajectory, site: str = "a") -> list[float]:
    return [e.t_s - T0_S for e in trajectory.events if e.site == site and e.event == "provision"]


# ------------------------------------------------------------------------------- config


def test_mpc_is_a_policy_kind_built_from_its_config():
    assert "mpc" in POLICY_KINDS and registered_policies()["mpc"] is MpcPolicy
    context = make_context({"a": pattern("LLHH")})
    config = MpcPolicyConfig(climatology_days=3, climatology_sigmas=1.5)
    policy = make_policy(config, context)
    assert isinstance(policy, MpcPolicy) and policy.config is config
    defaults = MpcPolicyConfig()
    assert (defaults.climatology_days, defaults.climatology_sigmas, defaults.hold_s) == (7, 1.0, 0.0)
    assert defaults.deadline_guard and defaults.forecast_horizon_s == 3900


def test_mpc_config_errors_name_the_key():
    base = {
        "traces": [{"path": str(REPO / "data/traces/watttime_moer_2026-01-11_4regions.csv")}],
        "sites": {"a": {"region": "CAISO_NORTH", "training_power_w": 1, "idle_power_w": 0, "tokens_per_s": 1}},
        "token_budget": 1,
    }
    for policy, words in (
        ({"kind": "mpc", "budget_margin": 2}, "budget_margin: unknown key"),
        ({"kind": "mpc", "climatology_days": 0}, "climatology_days"),
        ({"kind": "mpc", "climatology_sigmas": -1}, "climatology_sigmas"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_experiment({**base, "runs": [{"name": "r", "policy": policy, "sites": ["a"]}]})


# ------------------------------------------------------------------------------- the estimate


def days_of(hourly: list[float], days: int) -> list[float]:
    return [v for _ in range(days) for v in hourly]


def hourly_context(values: list[float], *, past_days: int, run_days: float = 1.0, **kwargs):
    signal = make_signal(values, region="a", step_s=HOUR_S)
    start_s = T0_S + past_days * DAY_S
    return make_context({"a": signal}, start_s=start_s, deadline_s=start_s + run_days * DAY_S, **kwargs)


def three_clean_hours_in_seven_days() -> list[float]:
    """Seven days of hourly 400 g, with hour 10 at 0 g on days 1, 3 and 5."""
    return [0.0 if hour == 10 and k in (1, 3, 5) else 400.0 for k in range(7) for hour in range(24)]


def test_climatology_counts_past_days_as_scenarios_not_their_mean():
    """Hour 10 was a 0 g window on 3 of the last 7 days and 400 g on the others (mean 229 g:
    never below the threshold). Beyond the horizon the plan counts 3/7 of that hour, every later
    day (sigmas = 0: the mean of the scenarios' supply)."""
    day, past = [400.0] * 24, three_clean_hours_in_seven_days()
    context = hourly_context(past + day, past_days=7, token_budget=1e15)
    policy = MpcPolicy(context, MpcPolicyConfig(forecast="none", climatology_sigmas=0))
    supply = policy.supply(context.start_s)
    assert supply.tokens == pytest.approx(3 / 7 * HOUR_S * RATE)
    assert set(supply.reference_ci_g_per_kwh.tolist()) == {0.0}  # one piece per scenario
    # two standard deviations of one day leave nothing to count on
    cautious = MpcPolicy(context, MpcPolicyConfig(forecast="none", climatology_sigmas=2))
    assert cautious.supply(context.start_s).tokens == 0.0


def test_over_many_days_the_plan_counts_on_the_mean_less_sigmas_of_a_sum_of_independent_days():
    day, past = [400.0] * 24, three_clean_hours_in_seven_days()
    context = hourly_context(past + day, past_days=7, run_days=100, token_budget=1e15)
    policy = MpcPolicy(context, MpcPolicyConfig(forecast="none", climatology_sigmas=2))
    p = 3 / 7
    per_day = HOUR_S * RATE
    expected = 100 * p * per_day - 2 * math.sqrt(100) * math.sqrt(p * (1 - p)) * per_day
    assert policy.supply(context.start_s).tokens == pytest.approx(expected)


def test_time_of_day_copies_are_counted_to_the_deadline_only():
    """A 2-hour window (hours 3 and 4) every past day; the run ends at 04:30 the next day: the
    plan counts hour 3 and half of hour 4."""
    day = [400.0] * 24
    day[3] = day[4] = 20.0
    context = hourly_context(days_of(day, 3) + day, past_days=3, run_days=4.5 / 24, token_budget=1e15)
    policy = MpcPolicy(context, MpcPolicyConfig(forecast="none", climatology_sigmas=0))
    assert policy.supply(context.start_s).tokens == pytest.approx(1.5 * HOUR_S * RATE)


def test_without_a_whole_day_of_past_nothing_beyond_the_horizon_is_counted():
    """The trace starts with the run: only the sample held now (and forecasts) count, so the
    plan needs every window and the price is the threshold."""
    day = [400.0] * 24
    day[3] = day[4] = 20.0
    context = hourly_context(days_of(day, 3), past_days=0, run_days=2, token_budget=RATE * HOUR_S)
    policy = MpcPolicy(context, MpcPolicyConfig(forecast="none"))
    assert policy.supply(context.start_s).tokens == 0.0
    assert policy.price_g_per_kwh(context.start_s, observe(context, context.start_s)) == math.inf
    # 23 h in, a day of past is still not whole: still nothing beyond the sample held now
    later_s = context.start_s + 23 * HOUR_S
    assert policy.supply(later_s).tokens == 0.0
    # a whole day in, yesterday is the scenario of the day left
    day_s = context.start_s + DAY_S
    assert policy.supply(day_s).tokens == pytest.approx(2 * HOUR_S * RATE)


def test_forecasts_fill_the_horizon_and_the_climatology_starts_after_it():
    """A 20 g window at hours 3-4 every day; a perfect forecast 2 h ahead issued at 02:00
    shows it: the plan counts it once (from the forecast), not twice."""
    day = [400.0] * 24
    day[3] = day[4] = 20.0
    context = hourly_context(days_of(day, 3), past_days=2, run_days=5 / 24, token_budget=1e15)
    context = with_perfect_forecasts(context, horizon_s=2 * HOUR_S)
    policy = MpcPolicy(context, MpcPolicyConfig(forecast="recorded", climatology_sigmas=0))
    now_s = context.start_s + 2 * HOUR_S  # 02:00: the forecast covers 03:00 and 04:00
    assert policy.supply(now_s).tokens == pytest.approx(2 * HOUR_S * RATE)


# ------------------------------------------------------------------------------- the plan


def test_with_forecasts_to_the_deadline_the_plan_waits_for_the_cleanest_window():
    """Site a: an 80 g window first; site b: a 10 g window later, long enough for the budget.
    Forecasts reaching the deadline make the plan the oracle's: only b trains. Without forecasts
    (and no past) the policy trains the first window it meets, and never outside windows."""
    a = [80.0] * 6 + [400.0] * 18
    b = [400.0] * 12 + [10.0] * 12
    budget = RATE * 30 * 60
    context = make_context({"a": a, "b": b}, token_budget=budget)
    informed = with_perfect_forecasts(context, horizon_s=24 * STEP_S)
    trajectory, summary = run(informed, forecast="recorded")
    assert trajectory.completed and not training(trajectory, "a")
    assert summary["emissions_kg"] <= 1.1 * emissions_lower_bound_kg(informed)  # b's start-up idles at 10 g
    blind, blind_summary = run(context, forecast="none")
    assert blind.completed and training(blind, "a")
    assert blind_summary["share_energy_in_windows"] > 0.99


def test_a_window_at_the_price_trains():
    """The marginal piece is in the plan: a 0 g window under a 0 g price trains."""
    context = make_context({"a": [0.0] * 12}, token_budget=RATE * 20 * 60)
    context = with_perfect_forecasts(context, horizon_s=12 * STEP_S)
    policy = MpcPolicy(context, MpcPolicyConfig(forecast="recorded"))
    assert policy.price_g_per_kwh(context.start_s, observe(context, context.start_s)) == 0.0
    trajectory, _ = run(context, forecast="recorded")
    assert trajectory.completed and training(trajectory)


@pytest.mark.parametrize(("before", "pre_provisions"), [(120.0, True), (800.0, False)])
def test_pre_provisioning_only_where_idling_costs_less_than_the_lost_start_up(before, pre_provisions):
    """A 30-min 50 g window after 20 min of ``before``; forecasts to the deadline (a finite
    price: 50 g). Idling 270 s at 120 g (4.2 g) costs less than provisioning inside the window
    and buying 270 s of training at the price (1.8 + 7.6 g); at 800 g (28 g) it does not."""
    values = [before] * 4 + [50.0] * 6 + [800.0] * 4
    context = make_context({"a": values}, token_budget=RATE * 10 * 60)
    context = with_perfect_forecasts(context, horizon_s=14 * STEP_S)
    trajectory, _ = run(context, forecast="recorded")
    assert trajectory.completed
    opens_s = 4 * STEP_S
    assert provisions(trajectory) == [opens_s - STARTUP_S if pre_provisions else opens_s]
    idle_s = seconds_in(trajectory, "a", SiteState.PROVISIONING)
    assert idle_s == pytest.approx(240.0)


def test_the_mpc_policy_refuses_a_live_run():
    """It reads each site's past as a trace; a live run's config says so before any cluster."""
    data = tomllib.loads((REPO / "experiments" / "live_demo.toml").read_text())
    data["runs"][0]["policy"] = {"kind": "mpc"}
    with pytest.raises(ConfigError, match="reads the signal ahead of now"):
        parse_experiment(data, base_dir=REPO / "experiments")


# ------------------------------------------------------------------------------- the paper trace


def goodput(summary: dict) -> float:
    """Training site-time over provisioned site-time (``summary.json``'s ``goodput``)."""
    hours = summary["site_hours"].values()
    trained = sum(h["training"] for h in hours)
    share = trained / (trained + sum(h["provisioned_idle"] for h in hours))
    assert summary["goodput"] == pytest.approx(share)
    return share


@pytest.fixture(scope="module")
def paper():
    """Every run of experiments/paper_mpc.toml, and the mpc runs again for 10 forecast seeds."""
    experiment = load_experiment(PAPER_MPC)
    runs = list(experiment.runs)
    for seed in SEEDS:
        for name in ("mpc", "mpc-perfect"):
            template = experiment.run(name)
            policy = template.policy.model_copy(update={"forecast_seed": seed})
            runs.append(template.model_copy(update={"name": f"{name}-seed{seed}", "policy": policy}))
    experiment = experiment.model_copy(update={"runs": runs})
    return {s["run"]: s for s in simulate(experiment, write=False).summaries}


def test_paper_mpc_meets_the_budget_inside_windows_with_goodput(paper):
    for name, summary in paper.items():
        if summary["policy"] != "mpc":
            continue
        assert summary["completed"], name
        assert summary["share_energy_in_windows"] >= 0.995, name
        assert goodput(summary) >= 0.95, name


def test_paper_mpc_is_monotonic_in_information(paper):
    def mean(prefix: str) -> float:
        return statistics.mean(paper[f"{prefix}-seed{seed}"]["emissions_kg"] for seed in SEEDS)

    perfect, synthetic, none = mean("mpc-perfect"), mean("mpc"), paper["mpc-no-forecast"]["emissions_kg"]
    assert perfect <= synthetic <= none
    assert paper["mpc-perfect-to-deadline"]["emissions_kg"] <= perfect


def test_paper_mpc_never_emits_more_than_the_threshold_policy(paper):
    threshold = paper["threshold"]["emissions_kg"]
    for name, summary in paper.items():
        if summary["policy"] == "mpc":
            assert summary["emissions_kg"] <= threshold, name


def test_paper_mpc_with_the_truth_to_the_deadline_approaches_the_oracle_run(paper):
    oracle = paper["oracle"]["emissions_kg"]
    informed = paper["mpc-perfect-to-deadline"]
    assert informed["emissions_kg"] <= 1.05 * oracle
    assert informed["emissions_kg"] >= informed["emissions_bound_kg"]


def test_paper_mpc_report(paper):
    """The comparison docs/POLICIES.md quotes (run with -s)."""
    synthetic = [paper[f"mpc-seed{seed}"]["emissions_kg"] for seed in SEEDS]
    perfect = [paper[f"mpc-perfect-seed{seed}"]["emissions_kg"] for seed in SEEDS]
    rows = [
        ("mpc, perfect forecasts 65 min (10 seeds)", f"{statistics.mean(perfect):.3f} ± {statistics.stdev(perfect):.3f}"),
        ("mpc, synthetic forecasts (10 seeds)", f"{statistics.mean(synthetic):.3f} ± {statistics.stdev(synthetic):.3f}"),
        ("mpc, no forecasts", f"{paper['mpc-no-forecast']['emissions_kg']:.3f}"),
        ("mpc, perfect forecasts to the deadline", f"{paper['mpc-perfect-to-deadline']['emissions_kg']:.3f}"),
        ("oracle run", f"{paper['oracle']['emissions_kg']:.3f}"),
        ("bound", f"{paper['oracle']['emissions_bound_kg']:.3f}"),
        ("budget (75 g, in-sample)", f"{paper['budget']['emissions_kg']:.3f}"),
        ("threshold", f"{paper['threshold']['emissions_kg']:.3f}"),
    ]
    print()
    for label, value in rows:
        print(f"{label:<42} {value} kg")
    for name in ("mpc", "mpc-no-forecast", "mpc-perfect", "mpc-perfect-to-deadline"):
        s = paper[name]
        print(
            f"{name:<24} in windows {s['share_energy_in_windows']:.4f}  goodput {goodput(s):.4f}  "
            f"hours {s['hours']:.2f}"
        )
    assert all(np.isfinite(synthetic))
