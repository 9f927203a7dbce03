"""The perfect-foresight oracle: the bound by hand, the oracle run on hand-made traces with known
optimal schedules, and the property that no policy ever beats the bound on random traces (nor,
when all its energy is inside windows, the windows-only bound)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planning_fixtures import IDLE_W, RATE, T0_S, TRAINING_W, make_context, summary_of

from curtail.config import POLICY_CONFIGS, CurtailmentRules, ExecutionConfig
from curtail.planning.oracle import cheapest_pieces, emissions_lower_bound_kg, windows_only_bound
from curtail.planning.policy import SiteState, make_policy
from curtail.planning.simulator import Simulator

NO_OVERHEAD_RULES = CurtailmentRules(provisioning_s=0, hysteresis_s=0)
NO_OVERHEAD = ExecutionConfig(group_start_s=0, sync_s=0, round_s=600)
STEP_S = 300.0


def kg(watts: float, seconds: float, ci: float) -> float:
    return watts * seconds * ci / 3.6e9


def run(context, kind: str, **params):
    trajectory = Simulator(context, make_policy(POLICY_CONFIGS[kind](**params), context)).run()
    return trajectory, summary_of(context, trajectory, kind)


def training(trajectory, site: str) -> list[tuple[float, float]]:
    return [
        (i.start_s - T0_S, i.end_s - T0_S)
        for i in trajectory.intervals_of(site)
        if i.state is SiteState.TRAINING
    ]


TWO_SITES = {"a": [100.0, 20.0, 300.0], "b": [50.0, 50.0, 10.0]}


def test_pieces_are_sorted_by_carbon_per_token():
    context = make_context(TWO_SITES)
    pieces = cheapest_pieces(context)
    assert list(pieces.ci_g_per_kwh) == [10, 20, 50, 50, 100, 300]
    assert [pieces.sites[i] for i in pieces.site_index[:2]] == ["b", "a"]
    assert pieces.g_per_token[0] == pytest.approx(TRAINING_W * 10 / 3.6e6 / RATE)


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (600, kg(TRAINING_W, 300, 10) + kg(TRAINING_W, 300, 20)),
        (450, kg(TRAINING_W, 300, 10) + kg(TRAINING_W, 150, 20)),
        (100, kg(TRAINING_W, 100, 10)),
        (1e9, sum(kg(TRAINING_W, 300, ci) for ci in (100, 20, 300, 50, 50, 10))),  # more than fits
    ],
)
def test_bound_by_hand(seconds, expected):
    context = make_context(TWO_SITES)
    assert emissions_lower_bound_kg(context, RATE * seconds) == pytest.approx(expected, rel=1e-12)


def test_bound_prefers_the_site_with_fewer_grams_per_token():
    # same intensity, but b needs twice the energy per token: a's pieces come first
    context = make_context({"a": [40.0] * 4, "b": [40.0] * 4}, rates={"b": RATE / 2})
    assert emissions_lower_bound_kg(context, RATE * 1200) == pytest.approx(kg(TRAINING_W, 1200, 40))


def test_oracle_run_trains_exactly_the_cheapest_pieces_without_overheads():
    # an expensive last sample: the oracle keeps the deadline's last 10 µs in reserve, so
    # pieces that end at the deadline are a hair short (see OraclePolicy)
    traces = {site: [*values, 800.0] for site, values in TWO_SITES.items()}
    context = make_context(
        traces, rules=NO_OVERHEAD_RULES, execution=NO_OVERHEAD, token_budget=RATE * 600
    )
    trajectory, summary = run(context, "oracle")
    assert trajectory.completed
    assert training(trajectory, "a") == [(300, 600)] and training(trajectory, "b") == [(600, 900)]
    assert summary["emissions_kg"] == pytest.approx(emissions_lower_bound_kg(context), rel=1e-9)


def test_oracle_does_not_preprovision_into_a_dirty_grid_when_tokens_are_free_later():
    context = make_context({"a": [800.0] * 2 + [0.0] * 12}, token_budget=RATE * 600)
    trajectory, summary = run(context, "oracle")
    assert trajectory.completed and summary["emissions_kg"] == 0.0
    assert [e.t_s - T0_S for e in trajectory.events if e.event == "provision"] == [600]


def test_oracle_preprovisions_when_idling_before_costs_less_than_the_lost_window():
    context = make_context({"a": [60.0] * 4 + [20.0] * 4 + [60.0] * 4}, token_budget=RATE * 1200)
    trajectory, summary = run(context, "oracle")
    startup_s = 240 + 30
    assert [e.t_s - T0_S for e in trajectory.events if e.event == "provision"] == [1200 - startup_s]
    assert training(trajectory, "a") == [(1200, 2400)]
    expected = kg(TRAINING_W, 1200, 20) + kg(IDLE_W, startup_s, 60)
    assert summary["emissions_kg"] == pytest.approx(expected, rel=1e-9)
    assert summary["emissions_kg"] >= emissions_lower_bound_kg(context)


# ------------------------------------------------------------------------------- never beaten

VALUES = st.sampled_from([0.0, 5.0, 20.0, 50.0, 80.0, 99.0, 100.0, 150.0, 400.0, 800.0])
POLICIES = [
    ("threshold", {}),
    ("always_on", {}),
    ("forecast", {"forecast": "synthetic"}),
    ("forecast", {"forecast": "none", "hold_s": 900.0}),
    ("budget", {"max_ci_g_per_kwh": 30.0}),
    ("budget", {"max_ci_g_per_kwh": 90.0, "pace_fraction": 0.5, "forecast": "synthetic"}),
    ("oracle", {}),
]


@st.composite
def small_runs(draw):
    num_sites = draw(st.integers(1, 3))
    length = draw(st.integers(4, 24))
    traces = {
        f"s{i}": draw(st.lists(VALUES, min_size=length, max_size=length)) for i in range(num_sites)
    }
    rates = {name: RATE * draw(st.sampled_from([0.5, 1.0, 2.0])) for name in traces}
    capacity = sum(rates.values()) * length * STEP_S
    budget = capacity * draw(st.floats(0.02, 1.1))
    overheads = draw(st.booleans())
    if overheads:
        rules = CurtailmentRules(
            provisioning_s=draw(st.sampled_from([0.0, 240.0])),
            hysteresis_s=draw(st.sampled_from([0.0, 600.0])),
        )
        execution = ExecutionConfig(
            group_start_s=draw(st.sampled_from([0.0, 30.0])),
            sync_s=draw(st.sampled_from([0.0, 5.0])),
            round_s=draw(st.sampled_from([300.0, 600.0])),
            join=draw(st.sampled_from(["immediate", "next_round"])),
        )
    else:
        rules, execution = NO_OVERHEAD_RULES, NO_OVERHEAD
    context = make_context(
        traces, rules=rules, execution=execution, token_budget=budget, rates=rates
    )
    return context, overheads


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(small_runs())
def test_no_policy_beats_the_oracle_bound_on_random_traces(case):
    context, overheads = case
    results = {}
    for kind, params in POLICIES:
        trajectory, summary = run(context, kind, **params)
        bound = emissions_lower_bound_kg(context, trajectory.tokens)
        assert summary["emissions_kg"] >= bound * (1 - 1e-9) - 1e-12, (kind, params)
        windows = windows_only_bound(context, trajectory.tokens)
        if windows.holds_tokens:
            assert windows.emissions_kg >= bound * (1 - 1e-9) - 1e-12
        if summary["share_energy_in_windows"] == 1.0:  # all its energy inside windows
            assert windows.holds_tokens, (kind, params)
            assert summary["emissions_kg"] >= windows.emissions_kg * (1 - 1e-9) - 1e-12, (kind, params)
        results[(kind, tuple(params.items()))] = (trajectory, summary)
    oracle, oracle_summary = results[("oracle", ())]
    if not overheads:
        # without overheads the oracle run is the bound, and nothing finishes that it cannot
        assert oracle_summary["emissions_kg"] == pytest.approx(
            emissions_lower_bound_kg(context, oracle.tokens), rel=1e-6, abs=1e-10
        )
        if any(t.completed for t, _ in results.values()):
            assert oracle.completed
