"""The emission bounds: the windows-only bound by hand, met exactly by an overhead-free threshold
run, honest when the windows cannot hold the budget; both bounds in summary.json and printed by
``curtail simulate``, on the paper trace and an average-intensity fortnight."""

from __future__ import annotations

import json

import pytest
from planning_fixtures import (
    PAPER_TOML,
    RATE,
    TRACES,
    TRAINING_W,
    make_context,
    simulate,
    summary_of,
)

from curtail.api import simulate as simulate_experiment
from curtail.cli import main
from curtail.config import CurtailmentRules, ExecutionConfig, parse_experiment
from curtail.planning.oracle import (
    cheapest_pieces,
    emission_bounds,
    emissions_lower_bound_kg,
    windows_only_bound,
)

NO_OVERHEAD_RULES = CurtailmentRules(provisioning_s=0, hysteresis_s=0)
NO_OVERHEAD = ExecutionConfig(group_start_s=0, sync_s=0, round_s=600)

# curtailed below the median of the last 15 minutes: thresholds a [40, 25, 30, 20, 30, 20],
# b [5, 32.5, 60, 60, 60, 60]; so only a's 10 g and 15 g pieces are inside windows, and b's 5 g
# piece (its first sample: the median of itself) is the cheapest piece of all, outside them
MEDIAN_OF_15_MIN = CurtailmentRules(
    threshold_kind="percentile", threshold_percentile=50, percentile_window_s=900
)
TWO_SITES = {"a": [40.0, 10.0, 30.0, 20.0, 50.0, 15.0], "b": [5.0, 60.0, 60.0, 60.0, 60.0, 60.0]}


def kg(seconds: float, ci: float) -> float:
    return TRAINING_W * seconds * ci / 3.6e9


def two_sites(**kwargs):
    return make_context(TWO_SITES, rules=MEDIAN_OF_15_MIN, **kwargs)


def test_windows_only_pieces_are_the_curtailed_ones():
    assert list(cheapest_pieces(two_sites(), windows_only=True).ci_g_per_kwh) == [10, 15]
    assert list(cheapest_pieces(two_sites()).ci_g_per_kwh[:4]) == [5, 10, 15, 20]


@pytest.mark.parametrize(
    "seconds, windows_only_kg, unconstrained_kg",
    [
        (300, kg(300, 10), kg(300, 5)),
        (450, kg(300, 10) + kg(150, 15), kg(300, 5) + kg(150, 10)),
        (600, kg(300, 10) + kg(300, 15), kg(300, 5) + kg(300, 10)),
    ],
)
def test_windows_only_bound_by_hand(seconds, windows_only_kg, unconstrained_kg):
    context = two_sites()
    bound = windows_only_bound(context, RATE * seconds)
    assert bound.holds_tokens and bound.emissions_kg == pytest.approx(windows_only_kg, rel=1e-12)
    assert bound.capacity_tokens == pytest.approx(RATE * 600)
    assert emissions_lower_bound_kg(context, RATE * seconds) == pytest.approx(unconstrained_kg, rel=1e-12)


def test_windows_that_cannot_hold_the_budget_say_so():
    bounds = emission_bounds(two_sites(token_budget=RATE * 900))
    assert bounds.windows_only.emissions_kg is None and not bounds.windows_only.holds_tokens
    assert bounds.windows_only.capacity_tokens == pytest.approx(RATE * 600)
    assert bounds.unconstrained.emissions_kg == pytest.approx(kg(300, 5) + kg(300, 10) + kg(300, 15))
    summary = bounds.summary(emissions_kg=1.0)
    assert summary["emissions_bound_windows_only_kg"] is None
    assert summary["emissions_over_windows_only_bound"] is None
    assert summary["windows_only_capacity_tokens"] == pytest.approx(RATE * 600)
    too_big = emission_bounds(two_sites(token_budget=RATE * 3601))  # more than both sites all along
    assert too_big.unconstrained.emissions_kg is None
    assert too_big.unconstrained.capacity_tokens == pytest.approx(RATE * 3600)


def test_an_overhead_free_threshold_run_through_every_window_meets_the_windows_only_bound():
    traces = {"a": [400.0, 20.0, 60.0, 300.0, 30.0, 500.0], "b": [80.0, 200.0, 10.0, 10.0, 900.0, 900.0]}
    context = make_context(traces, rules=NO_OVERHEAD_RULES, execution=NO_OVERHEAD)
    capacity = windows_only_bound(context).capacity_tokens
    assert capacity == pytest.approx(RATE * 300 * 6)
    context = make_context(
        traces, rules=NO_OVERHEAD_RULES, execution=NO_OVERHEAD, token_budget=capacity
    )
    trajectory = simulate(context, "threshold")
    summary = summary_of(context, trajectory)
    assert trajectory.completed and summary["share_energy_in_windows"] == pytest.approx(1.0)
    assert summary["emissions_kg"] == pytest.approx(
        windows_only_bound(context).emissions_kg, rel=1e-9
    )


# ------------------------------------------------------------------------------- the paper trace


@pytest.fixture(scope="module")
def paper():
    return simulate_experiment(
        PAPER_TOML, runs=["threshold", "centralized-de", "always-on-federated"], write=False
    )


def test_paper_threshold_run_between_the_bounds(paper):
    summary = paper.summary("threshold")
    unconstrained = summary["emissions_bound_kg"]
    windows = summary["emissions_bound_windows_only_kg"]
    assert 0.33 < unconstrained <= windows <= summary["emissions_kg"]
    assert windows == pytest.approx(0.3325, abs=5e-4)  # the cheapest 12.27B tokens are all curtailed
    assert summary["emissions_over_windows_only_bound"] == pytest.approx(
        summary["emissions_kg"] / windows
    )
    assert summary["emissions_kg_per_1b_tokens"] == pytest.approx(
        summary["emissions_kg"] / summary["tokens"] * 1e9
    )
    assert summary["windows_only_capacity_tokens"] >= summary["token_budget"]
    json.dumps(summary)  # plain floats and None


def test_paper_runs_whose_windows_cannot_hold_the_budget(paper):
    germany = paper.summary("centralized-de")  # no sample below 100 g
    assert germany["emissions_bound_windows_only_kg"] is None
    assert germany["windows_only_capacity_tokens"] == 0
    assert germany["emissions_bound_kg"] <= germany["emissions_kg"]
    federated = paper.summary("always-on-federated")  # two sites to the deadline: 11.4B in windows
    assert federated["emissions_bound_windows_only_kg"] is None
    assert 0 < federated["windows_only_capacity_tokens"] < federated["token_budget"]


def test_curtail_simulate_prints_both_bounds(tmp_path, capsys):
    assert main(["simulate", str(PAPER_TOML), "--run", "threshold", "--run", "centralized-de",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "emission bounds" in out and "windows-only bound kg" in out
    row = next(line for line in out.splitlines() if "threshold" in line and "0.333" in line)
    assert "1.413" in row and "4.25" in row  # emissions, x windows-only bound
    assert "none: windows hold 0 of 12.27B" in out
    written = json.loads((tmp_path / "paper" / "threshold" / "summary.json").read_text())
    assert written["emissions_bound_windows_only_kg"] == pytest.approx(0.3325, abs=5e-4)


# ------------------------------------------------------------------------------- average intensity


def fortnight(site_hours: float) -> dict:
    """Germany and Great Britain, 2020 average intensity, percentile curtailment, 1-15 March."""
    site = {"training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": 191_454}
    return {
        "name": "average",
        "token_budget": 191_454 * 3600 * site_hours,
        "traces": [
            {"path": str(TRACES / f"avg_ci_2020_{name}.csv"), "signal": "average",
             "naive_timezone": "UTC", "columns": {"Carbon Intensity": region}}
            for name, region in (("germany", "DE"), ("great-britain", "GB"))
        ],
        "rules": {"threshold_kind": "percentile", "threshold_percentile": 20},
        "sites": {"de": {"region": "DE", **site}, "gb": {"region": "GB", **site}},
        "runs": [
            {"name": kind, "policy": {"kind": kind}, "sites": ["de", "gb"],
             "start": "2020-03-01T00:00:00Z", "deadline": "2020-03-15T00:00:00Z"}
            for kind in ("threshold", "oracle")
        ],
    }


def test_on_average_intensity_the_unconstrained_bound_is_no_curtailment_bound():
    result = simulate_experiment(parse_experiment(fortnight(160)), write=False)
    threshold, oracle = result.summary("threshold"), result.summary("oracle")
    unconstrained, windows = oracle["emissions_bound_kg"], oracle["emissions_bound_windows_only_kg"]
    assert unconstrained < 0.98 * windows  # measured: 43.96 vs 45.81 kg
    assert windows <= threshold["emissions_kg"]
    # the oracle run chases the unconstrained bound outside the windows: under the windows-only one
    assert oracle["share_energy_in_windows"] < 0.9 and oracle["emissions_kg"] < windows


def test_on_average_intensity_windows_too_short_for_the_budget():
    summary = simulate_experiment(parse_experiment(fortnight(200)), runs=["threshold"], write=False).summary(
        "threshold"
    )
    assert summary["emissions_bound_windows_only_kg"] is None
    assert 0.5 * summary["token_budget"] < summary["windows_only_capacity_tokens"] < summary["token_budget"]
    assert summary["emissions_bound_kg"] is not None
