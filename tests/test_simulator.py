"""The discrete-event simulator on hand-made traces with known answers, its accounting identities,
and the prior system's published table on the paper trace."""

from __future__ import annotations

import contextlib
import itertools
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from planning_fixtures import (
    PAPER_TOML,
    RATE,
    REPO,
    T0_S,
    at,
    make_context,
    pattern,
    power_of,
    seconds_in,
    simulate,
    summary_of,
)

from curtail.api import simulate as simulate_experiment
from curtail.config import CurtailmentRules, ExecutionConfig, load_experiment
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.policy import Decision, Observation, SiteState, ThresholdPolicy, make_policy
from curtail.planning.simulator import PolicyProtocolError, Simulator
from curtail.planning.trajectory import RunMode

INSTANT = CurtailmentRules(
    hysteresis_s=0, provisioning_s=0
)  # windows = the low samples, ready at once
NO_OVERHEAD = ExecutionConfig(group_start_s=0, sync_s=0, round_s=600)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Turn a simulator that never finishes into a test failure."""

    def expire(signum, frame):
        raise TimeoutError(f"simulation still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def events(trajectory, name: str) -> list:
    return [e for e in trajectory.events if e.event == name]


# ------------------------------------------------------------------------------- one site


def test_always_on_single_site_finishes_at_budget_over_rate():
    context = make_context(
        {"a": pattern("H" * 24)}, rules=INSTANT, execution=NO_OVERHEAD, token_budget=3.6e6
    )
    trajectory = simulate(context, "always_on")
    assert trajectory.completed and trajectory.finish_s == pytest.approx(T0_S + 3600, abs=1e-6)
    assert trajectory.tokens == pytest.approx(3.6e6, rel=1e-12)
    assert trajectory.num_syncs == 0 and len(events(trajectory, "round_start")) == 1


def test_always_on_pays_provisioning_and_group_start_once():
    context = make_context(
        {"a": pattern("H" * 24)}, execution=ExecutionConfig(), token_budget=3.6e6
    )
    trajectory = simulate(context, "always_on")
    assert trajectory.finish_s == pytest.approx(T0_S + 240 + 30 + 3600, abs=1e-6)
    assert seconds_in(trajectory, "a", SiteState.PROVISIONING) == 240
    assert seconds_in(trajectory, "a", SiteState.STARTING) == 30
    summary = summary_of(context, trajectory, "always_on")
    assert summary["mode_hours"] == pytest.approx(
        {"IDLE": 270 / 3600, "SINGLE": 1.0, "FEDERATED": 0.0}
    )
    assert summary["energy_kwh"] == pytest.approx((468 * 270 + 2024 * 3600) / 3.6e6, rel=1e-12)


def test_threshold_single_site_trains_from_open_plus_startup_through_the_countdown():
    # low from 600 s; high from 2400 s: the window closes 600 s later, at 3000 s
    context = make_context({"a": pattern("HH" + "L" * 6 + "H" * 8)}, execution=ExecutionConfig())
    trajectory = simulate(context)
    assert [(e.event, e.t_s - T0_S) for e in trajectory.events if e.site == "a"] == [
        ("provision", 600),
        ("nodes_ready", 840),
        ("ready", 870),
        ("leave_round", 3000),
        ("drain", 3000),
    ]
    training = [
        (i.start_s - T0_S, i.end_s - T0_S)
        for i in trajectory.intervals_of("a")
        if i.state is SiteState.TRAINING
    ]
    assert training == [(870, 3000)]
    assert trajectory.tokens_by_site["a"] == pytest.approx(RATE * 2130)
    assert not trajectory.completed and trajectory.finish_s == T0_S + 16 * 300


# ------------------------------------------------------------------------------- two sites

OVERLAP = {
    "a": pattern("HH" + "L" * 10 + "H" * 12),  # window 0:10 .. 1:00
    "b": pattern("H" * 6 + "L" * 12 + "H" * 6),  # window 0:30 .. 1:30; the trace ends at 2:00
}


@pytest.mark.parametrize("round_s, num_syncs", [(300, 7), (600, 4), (900, 3), (1800, 2)])
def test_overlapping_windows_give_single_federated_idle(round_s, num_syncs):
    context = make_context(
        OVERLAP, rules=INSTANT, execution=NO_OVERHEAD.model_copy(update={"round_s": round_s})
    )
    trajectory = simulate(context)
    summary = summary_of(context, trajectory)
    # IDLE 0:00-0:10 and 1:30-2:00; SINGLE 0:10-0:30 (a) and 1:00-1:30 (b); FEDERATED 0:30-1:00
    assert summary["mode_hours"] == pytest.approx(
        {"IDLE": 40 / 60, "SINGLE": 50 / 60, "FEDERATED": 30 / 60}
    )
    assert (
        sum(summary["mode_hours"].values()) == pytest.approx(summary["hours"])
        and summary["hours"] == 2
    )
    assert [(m.mode, m.start_s - T0_S, m.end_s - T0_S) for m in trajectory.modes] == [
        (RunMode.IDLE, 0, 600),
        (RunMode.SINGLE, 600, 1800),
        (RunMode.FEDERATED, 1800, 3600),
        (RunMode.SINGLE, 3600, 5400),
        (RunMode.IDLE, 5400, 7200),
    ]
    # one hand-off sync when b arrives, then one per federated round until a leaves at 1:00
    assert trajectory.num_syncs == num_syncs == len(events(trajectory, "sync"))
    assert events(trajectory, "sync")[0].t_s == at(30)
    assert trajectory.tokens_by_site == pytest.approx({"a": RATE * 50 * 60, "b": RATE * 60 * 60})
    assert trajectory.tokens == pytest.approx(sum(trajectory.tokens_by_site.values()))
    assert not trajectory.completed and trajectory.finish_s == at(120)


def three_sites(join: str):
    """a and b curtailed from the start; c from 0:05, in the middle of the first 600 s round."""
    execution = ExecutionConfig(group_start_s=0, sync_s=5, round_s=600, join=join)
    context = make_context(
        {"a": pattern("L" * 12), "b": pattern("L" * 12), "c": pattern("H" + "L" * 11)},
        rules=CurtailmentRules(provisioning_s=0),
        execution=execution,
        deadline_s=at(30),
    )
    return simulate(context)


def test_join_immediate_pays_one_sync():
    trajectory = three_sites("immediate")
    c = [
        (i.state, i.start_s - T0_S, i.end_s - T0_S)
        for i in trajectory.intervals_of("c")
        if i.state.provisioned
    ]
    assert c[:3] == [
        (SiteState.SYNCING, 300, 305),
        (SiteState.TRAINING, 305, 600),
        (SiteState.SYNCING, 600, 605),
    ]
    assert [e.t_s - T0_S for e in events(trajectory, "join_round")] == [300]
    # c trains [305, 600), [605, 1205), [1210, 1800); a and b [0, 600), [605, 1205), [1210, 1800)
    assert trajectory.tokens_by_site == pytest.approx(
        {"a": RATE * 1790, "b": RATE * 1790, "c": RATE * 1485}
    )
    assert trajectory.num_syncs == 2


def test_join_next_round_waits_for_the_round_end():
    trajectory = three_sites("next_round")
    c = [
        (i.state, i.start_s - T0_S, i.end_s - T0_S)
        for i in trajectory.intervals_of("c")
        if i.state.provisioned
    ]
    assert c[:3] == [
        (SiteState.WAITING, 300, 600),
        (SiteState.SYNCING, 600, 605),
        (SiteState.TRAINING, 605, 1205),
    ]
    assert events(trajectory, "join_round") == []
    assert events(trajectory, "round_start")[1].details["sites"] == ["a", "b", "c"]
    assert trajectory.tokens_by_site == pytest.approx(
        {"a": RATE * 1790, "b": RATE * 1790, "c": RATE * 1190}
    )
    # the waiting joiner is provisioned but idle: idle power for 300 s more than with "immediate"
    waiting = seconds_in(trajectory, "c", SiteState.WAITING)
    assert waiting == 300


@pytest.mark.parametrize("sites", [("a",), ("a", "b")])
def test_round_restart_costs_restart_s_per_round(sites):
    def run(restart_s):
        execution = ExecutionConfig(
            group_start_s=0, sync_s=5, round_s=600, round_restart_s=restart_s
        )
        context = make_context(
            {s: pattern("L" * 12) for s in sites}, rules=INSTANT, execution=execution
        )
        return simulate(context, "always_on")

    base, restarted = run(0), run(100)
    rounds = len(events(restarted, "round_start"))
    assert rounds == len(events(base, "round_start")) == (6 if len(sites) == 2 else 1)
    for site in sites:
        assert base.tokens_by_site[site] - restarted.tokens_by_site[site] == pytest.approx(
            100 * RATE * rounds
        )
        assert seconds_in(restarted, site, SiteState.STARTING) == pytest.approx(100 * rounds)


def test_prior_system_round_is_647_s_of_which_509_trained():
    execution = ExecutionConfig(group_start_s=0, sync_s=47, round_s=600, round_restart_s=91)
    context = make_context(
        {"a": pattern("L" * 12), "b": pattern("L" * 12)}, rules=INSTANT, execution=execution
    )
    trajectory = simulate(context, "always_on")
    starts = [e.t_s - T0_S for e in events(trajectory, "round_start")]
    assert starts[:5] == [0, 647, 1294, 1941, 2588]
    training = [i for i in trajectory.intervals_of("a") if i.state is SiteState.TRAINING]
    assert [i.duration_s for i in training[:4]] == [509, 509, 509, 509]


class RecordingThreshold(ThresholdPolicy):
    """The threshold policy, remembering the token count it was shown at every decision."""

    kind = "threshold"

    def __init__(self, context):
        super().__init__(context)
        self.seen: list[tuple[float, float]] = []

    def decide(self, now_s: float, observation: Observation) -> Decision:
        self.seen.append((now_s, observation.tokens_trained))
        return super().decide(now_s, observation)


def test_a_site_leaving_mid_round_keeps_its_tokens():
    # a: curtailed for 0:00-0:10 only; b all along; one 1200 s federated round from 0:00
    context = make_context(
        {"a": pattern("LL" + "H" * 10), "b": pattern("L" * 12)},
        rules=INSTANT,
        execution=NO_OVERHEAD.model_copy(update={"round_s": 1200}),
        token_budget=RATE * (600 + 1500),
    )
    policy = RecordingThreshold(context)
    trajectory = Simulator(context, policy).run()
    assert [(e.site, e.t_s - T0_S) for e in events(trajectory, "leave_round")] == [("a", 600)]
    assert trajectory.tokens_by_site == pytest.approx({"a": RATE * 600, "b": RATE * 1500})
    # nothing lost: the budget is reached exactly when a's 600 s plus b's 1500 s are trained
    assert trajectory.completed and trajectory.finish_s == pytest.approx(at(25))
    assert trajectory.tokens == pytest.approx(context.token_budget, rel=1e-12)
    tokens_seen = [tokens for _, tokens in policy.seen]
    assert tokens_seen == sorted(tokens_seen)
    assert dict(policy.seen)[at(10)] == pytest.approx(RATE * (600 + 600))


def test_deadline_before_budget():
    context = make_context(
        {"a": pattern("L" * 12)},
        rules=INSTANT,
        execution=NO_OVERHEAD,
        token_budget=1e12,
        deadline_s=at(45),
    )
    trajectory = simulate(context, "always_on")
    assert not trajectory.completed and trajectory.finish_s == at(45)
    assert (
        trajectory.tokens == pytest.approx(RATE * 45 * 60)
        and trajectory.tokens < context.token_budget
    )
    assert [e.event for e in trajectory.events][-2:] == ["deadline", "mode"]
    assert summary_of(context, trajectory, "always_on")["completed"] is False


@pytest.mark.parametrize("budget", [1234567.0, 1.2e6 + 1e-3, 7.0])
def test_budget_reached_mid_federated_round(budget):
    # epoch-second clocks resolve ~2e-7 s: the last tokens must not stall the loop (it once did)
    context = make_context(
        {"a": pattern("L" * 12), "b": pattern("L" * 12)},
        rules=INSTANT,
        execution=NO_OVERHEAD,
        token_budget=budget,
    )
    with time_limit(10):
        trajectory = simulate(context)
    # exact to within one microsecond of training (the clock's resolution near 2026 is ~2e-7 s)
    assert trajectory.completed and abs(trajectory.tokens - budget) <= 2 * RATE * 1e-6
    assert trajectory.finish_s == pytest.approx(T0_S + budget / (2 * RATE), abs=1e-6)
    assert trajectory.tokens_by_site["a"] == pytest.approx(trajectory.tokens_by_site["b"])


def test_same_inputs_same_trajectory():
    first = simulate(make_context(OVERLAP, execution=ExecutionConfig(sync_s=5, round_restart_s=20)))
    second = simulate(
        make_context(OVERLAP, execution=ExecutionConfig(sync_s=5, round_restart_s=20))
    )
    assert first == second and first.events == second.events and first.intervals == second.intervals


class AsksForNow(ThresholdPolicy):
    kind = "threshold"

    def decide(self, now_s: float, observation: Observation) -> Decision:
        return Decision(super().decide(now_s, observation).intents, next_decision_s=now_s)


def test_policy_protocol_errors():
    context = make_context({"a": pattern("L" * 4)}, rules=INSTANT, execution=NO_OVERHEAD)
    with pytest.raises(PolicyProtocolError, match="not after now"):
        Simulator(context, AsksForNow(context)).run()
    with pytest.raises(ValueError, match="unknown policy kind 'greedy'"):
        make_policy(SimpleNamespace(kind="greedy"), context)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- accounting


def check_accounting(context, trajectory, summary):
    """Identities every run must satisfy, whatever the policy."""
    power = power_of(context)
    energy_kwh = (
        sum(power[i.site].power_w(i.state) * i.duration_s for i in trajectory.intervals) / 3.6e6
    )
    assert summary["energy_kwh"] == pytest.approx(energy_kwh, rel=1e-9)
    assert sum(summary["energy_kwh_by_site"].values()) == pytest.approx(
        summary["energy_kwh"], rel=1e-9
    )
    assert sum(summary["emissions_kg_by_site"].values()) == pytest.approx(
        summary["emissions_kg"], rel=1e-9
    )
    assert 0.0 <= summary["share_energy_in_windows"] <= 1.0
    assert 0.0 <= summary["window_utilisation"] <= 1.0
    assert summary["tokens"] == pytest.approx(sum(summary["tokens_by_site"].values()), rel=1e-12)
    assert sum(summary["mode_hours"].values()) == pytest.approx(summary["hours"], rel=1e-9)
    for site, cfg in context.sites.items():
        intervals = trajectory.intervals_of(site)
        training_s = sum(i.duration_s for i in intervals if i.state is SiteState.TRAINING)
        idle_s = sum(
            i.duration_s
            for i in intervals
            if i.state.provisioned and i.state is not SiteState.TRAINING
        )
        assert summary["site_hours"][site]["training"] == pytest.approx(
            training_s / 3600, rel=1e-9, abs=1e-12
        )
        assert summary["site_hours"][site]["provisioned_idle"] == pytest.approx(
            idle_s / 3600, rel=1e-9, abs=1e-12
        )
        assert trajectory.tokens_by_site[site] == pytest.approx(
            cfg.tokens_per_s * training_s, rel=1e-9, abs=1e-6
        )
        for earlier, later in itertools.pairwise(intervals):  # a site is in one state at a time
            assert earlier.end_s <= later.start_s + 1e-9
        assert all(
            trajectory.start_s <= i.start_s < i.end_s <= trajectory.finish_s for i in intervals
        )
    if summary["completed"]:
        assert summary["tokens"] == pytest.approx(summary["token_budget"], rel=1e-9)


@pytest.mark.parametrize("policy", ["threshold", "always_on"])
@pytest.mark.parametrize("join", ["immediate", "next_round"])
def test_accounting_identities_hand_made(policy, join):
    execution = ExecutionConfig(sync_s=5, round_restart_s=20, join=join)
    traces = {**OVERLAP, "c": pattern("HHHH" + "L" * 4 + "HLHLLLH" + "L" * 9)}
    context = make_context(traces, execution=execution, token_budget=RATE * 3600 * 1.5)
    trajectory = simulate(context, policy)
    check_accounting(context, trajectory, summary_of(context, trajectory, policy))


@pytest.fixture(scope="module")
def paper():
    result = simulate_experiment(PAPER_TOML, write=False)
    return {s["run"]: s for s in result.summaries}


@pytest.mark.parametrize(
    "site, emissions_kg, share",
    [
        ("caiso_north", 11.4, 0.33),
        ("spp_tx", 14.5, 0.37),
        ("nem_sa", 12.3, 0.59),
        ("de", 27.1, 0.0),
    ],
)
def test_published_centralized_baselines(paper, site, emissions_kg, share):
    summary = paper[f"centralized-{site}"]
    assert summary["completed"] and summary["sites"] == [site]
    assert summary["emissions_kg"] == pytest.approx(emissions_kg, rel=0.05)
    assert summary["share_energy_in_windows"] == pytest.approx(share, rel=0.05, abs=0.0)
    assert summary["hours"] == pytest.approx(17.8, abs=0.01)
    assert summary["energy_kwh"] == pytest.approx(2.024 * 17.8, rel=1e-3)


@pytest.mark.parametrize("run", ["threshold", "threshold-prior-overheads"])
def test_published_curtailment_aware_runs(paper, run):
    summary = paper[run]
    assert summary["completed"] and summary["sites"] == ["caiso_north", "spp_tx", "nem_sa"]
    assert summary["share_energy_in_windows"] >= 0.97
    assert 0.9 <= summary["emissions_kg"] <= 1.6
    assert (
        summary["num_syncs"] > 0
        and summary["mode_hours"]["FEDERATED"] > 0
        and summary["mode_hours"]["SINGLE"] > 0
    )
    if run == "threshold-prior-overheads":
        assert summary["hours"] == pytest.approx(14.6, rel=0.05)


def test_paper_accounting_and_determinism():
    experiment = load_experiment(PAPER_TOML)
    traces, forecasts = load_experiment_traces(experiment)
    for run in experiment.runs:
        plan = plan_run(experiment, run, traces, forecasts)
        trajectory = Simulator(plan.context, plan.policy).run()
        check_accounting(
            plan.context, trajectory, summary_of(plan.context, trajectory, run.policy.kind)
        )
        again = plan_run(experiment, run, traces, forecasts)
        assert Simulator(again.context, again.policy).run() == trajectory


def test_the_bounds_are_at_the_power_the_accounting_uses():
    import dataclasses

    from curtail.planning.energy import PowerModel
    from curtail.runlog import bounds_of

    experiment = load_experiment(PAPER_TOML)
    traces, forecasts = load_experiment_traces(experiment)
    plan = plan_run(experiment, experiment.run("threshold"), traces, forecasts)
    configured = bounds_of(plan)
    assert configured is not None
    measured = dataclasses.replace(  # a real run's measured power: twice the configured
        plan, power={site: PowerModel(2 * p.training_w, p.idle_w) for site, p in plan.power.items()}
    )
    doubled = bounds_of(measured)
    assert doubled is not None
    assert doubled.windows_only.emissions_kg == pytest.approx(2 * configured.windows_only.emissions_kg)
    assert doubled.unconstrained.emissions_kg == pytest.approx(2 * configured.unconstrained.emissions_kg)
    assert doubled.windows_only.capacity_tokens == configured.windows_only.capacity_tokens


def test_planning_imports_neither_torch_nor_ray():
    code = (
        "import curtail.planning.simulator, curtail.planning.plan, curtail.planning.summary, curtail.api, sys; "
        "bad = sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules); "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_goodput_is_training_over_provisioned_site_time():
    """The summary's ``goodput`` is the training share of all provisioned site-time (start-ups,
    syncs and waits are the rest)."""
    from curtail.runlog import summary_of

    experiment = load_experiment("experiments/paper_policies.toml")
    traces, forecasts = load_experiment_traces(experiment)
    run = next(r for r in experiment.runs if r.policy.kind == "threshold")
    plan = plan_run(experiment, run, traces, forecasts)
    trajectory = Simulator(plan.context, plan.policy).run()
    summary = summary_of(plan, trajectory, executor="simulator")
    hours = summary["site_hours"]
    training = sum(h["training"] for h in hours.values())
    assert summary["goodput"] == pytest.approx(training / (training + sum(h["provisioned_idle"] for h in hours.values())))
    assert 0.95 < summary["goodput"] < 1.0  # the threshold policy on the paper trace: 97.9 %
