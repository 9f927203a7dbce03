"""Ray Tune sweeps over policies: the search space and trial plumbing (no Ray), a real Tune sweep
of simulator trials, and one short real training run as a Tune trial (both marked slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from planning_fixtures import REPO

from curtail.config import ConfigError, SweepConfig, load_experiment, parse_experiment
from curtail.policy_sweep import (
    METRICS,
    MISSED_PENALTY,
    objective,
    param_space,
    pareto_front,
    plot_pareto,
    policy_variants,
    rank_trials,
    simulate_one,
    trial_experiment,
    trial_policy,
)

PAPER_POLICIES = REPO / "experiments/paper_policies.toml"
SWEEP_POLICIES = REPO / "experiments/sweep_policies.toml"


def paper_with_sweep(**sweep) -> dict:
    """paper_policies.toml as a dict, with a [sweep] section."""
    import tomllib

    data = tomllib.loads(PAPER_POLICIES.read_text())
    data["traces"][0]["path"] = str(REPO / "data/traces/watttime_moer_2026-01-11_4regions.csv")
    data["sweep"] = sweep
    return data


SMALL_SWEEP = {
    "tune_run": "threshold",
    "eval_runs": ["forecast"],
    "num_samples": 1,
    "cpus_per_trial": 0.1,
    "max_concurrent_trials": 2,
    "policies": [
        {"kind": "threshold"},
        {"kind": "budget", "params": {"max_ci_g_per_kwh": {"grid": [40.0, 75.0]}, "hold_s": 0.0}},
    ],
    "execution": {"round_s": {"choice": [600.0]}},
}


# ------------------------------------------------------------------------------- config and space


def test_the_sweep_experiment_loads_with_its_search_space():
    experiment = load_experiment(SWEEP_POLICIES)
    sweep = experiment.sweep
    assert (
        sweep is not None
        and sweep.tune_run == "tune-first-half"
        and sweep.eval_runs == ["eval-second-half"]
    )
    assert {p.kind for p in sweep.policies} == {"threshold", "forecast", "budget"}
    assert sweep.num_samples * len(policy_variants(sweep)) >= 100  # the benchmark's >= 100 trials


@pytest.mark.parametrize(
    "change, message",
    [
        ({"policies": [{"kind": "budget", "params": {"max_ci": 50}}]}, "has no parameters"),
        ({"policies": [{"kind": "oracle"}]}, "the oracle is the bound"),
        ({"policies": [{"kind": "threshold"}, {"kind": "threshold"}]}, "each policy kind once"),
        ({"rules": {"threshold": {"uniform": [50, 150]}}}, "sweep.rules has no fields"),
        ({"rules": {"hysteresis_s": {"uniform": [5, 1]}}}, "low < high"),
        ({"rules": {"hysteresis_s": {"uniform": [0, 1], "choice": [1]}}}, "exactly one"),
        ({"tune_run": "nope"}, "sweep names runs"),
    ],
)
def test_bad_sweeps_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_experiment(paper_with_sweep(**{**SMALL_SWEEP, **change}))


def test_grids_are_crossed_per_policy_kind():
    sweep = SweepConfig.model_validate(
        {
            "tune_run": "x",
            "policies": [
                {"kind": "threshold"},
                {
                    "kind": "forecast",
                    "params": {"bridge_s": {"grid": [0, 600]}, "hold_s": {"grid": [0, 60, 600]}},
                },
                {
                    "kind": "budget",
                    "params": {"max_ci_g_per_kwh": {"uniform": [30, 90]}, "hold_s": 0},
                },
            ],
        }
    )
    variants = policy_variants(sweep)
    assert len(variants) == 1 + 2 * 3 + 1
    assert {"kind": "budget", "hold_s": 0} in variants
    trial = {
        "variant": {"kind": "budget", "hold_s": 0},
        "budget.max_ci_g_per_kwh": 42.0,
        "forecast.bridge_s": 9,
    }
    assert trial_policy(trial) == {"kind": "budget", "hold_s": 0, "max_ci_g_per_kwh": 42.0}


def test_a_trial_is_the_run_with_its_policy_and_overrides():
    experiment = parse_experiment(paper_with_sweep(**SMALL_SWEEP))
    trial = {
        "variant": {"kind": "budget", "hold_s": 0.0},
        "budget.max_ci_g_per_kwh": 75.0,
        "rules.hysteresis_s": 0.0,
        "execution.round_s": 300.0,
    }
    reduced = trial_experiment(experiment, "threshold", trial)
    run = reduced.runs[0]
    assert [r.name for r in reduced.runs] == ["threshold"] and reduced.sweep is None
    assert run.policy.kind == "budget" and run.policy.max_ci_g_per_kwh == 75.0
    assert reduced.rules_for(run).hysteresis_s == 0 and reduced.rules_for(run).provisioning_s == 240
    assert reduced.execution_for(run).round_s == 300 and reduced.execution_for(run).sync_s == 5
    with pytest.raises(Exception, match="max_ci_g_per_kwh"):
        trial_experiment(experiment, "threshold", {**trial, "budget.max_ci_g_per_kwh": -1.0})


def test_simulating_a_trial_matches_curtail_simulate():
    import curtail

    experiment = load_experiment(PAPER_POLICIES)
    from curtail.planning.plan import load_experiment_traces

    traces, forecasts = load_experiment_traces(experiment)
    summary = simulate_one(
        trial_experiment(
            experiment, "budget", {"variant": experiment.run("budget").policy.model_dump()}
        ),
        traces,
        forecasts,
    )
    reference = curtail.simulate(PAPER_POLICIES, runs=["budget"], write=False).summary("budget")
    for key in METRICS:
        assert summary[key] == pytest.approx(reference[key]), key


# ------------------------------------------------------------------------------- results


TRIALS = pd.DataFrame(
    {
        "policy": ["a", "b", "c", "d", "e"],
        "hours": [10.0, 12.0, 11.0, 9.0, 20.0],
        "emissions_kg": [5.0, 3.0, 4.0, 1.0, 2.0],
        "completed": [True, True, True, False, True],
    }
)


def test_pareto_front_of_completed_trials():
    front = pareto_front(TRIALS)
    assert list(front["policy"]) == ["a", "c", "b", "e"]  # d missed its budget
    assert list(pareto_front(TRIALS.assign(emissions_kg=[5, 3, 6, 1, 4]))["policy"]) == ["a", "b"]


def _spec(**changes) -> SweepConfig:
    return SweepConfig.model_validate({**SMALL_SWEEP, **changes})


def test_ranking_puts_missed_budgets_and_late_finishes_last():
    assert list(rank_trials(TRIALS, _spec())["policy"]) == ["e", "b", "c", "a", "d"]
    assert rank_trials(TRIALS, _spec(require_completed=False))["policy"].iloc[0] == "d"
    assert list(rank_trials(TRIALS, _spec(max_hours=15))["policy"])[:2] == ["b", "c"]


def test_the_objective_tune_minimises_ranks_as_the_sweep_does():
    """What Tune (and Optuna) minimise orders the trials exactly as the ranking does."""
    spec = _spec(max_hours=15)
    values = [objective(row, spec) for _, row in TRIALS.iterrows()]
    assert values[1] == 3.0 and values[4] == 2.0 + MISSED_PENALTY and values[3] == 1.0 + MISSED_PENALTY
    by_objective = [TRIALS.policy[i] for i in sorted(range(len(values)), key=lambda i: (values[i], TRIALS.hours[i]))]
    assert by_objective == list(rank_trials(TRIALS, spec)["policy"])
    assert objective({"completed": True, "hours": 1.0, "energy_kwh": 7.5}, _spec(metric="energy_kwh")) == 7.5


def test_optuna_takes_the_variants_as_a_choice_and_the_same_number_of_trials():
    from ray.tune.search.sample import Categorical

    from curtail.policy_sweep import _num_samples

    assert isinstance(param_space(_spec(search="optuna"))["variant"], Categorical)
    assert isinstance(param_space(_spec())["variant"], dict)  # grid_search
    assert _num_samples(_spec(search="optuna", num_samples=2)) == 2 * 3 == 2 * len(policy_variants(_spec()))


def test_pareto_plot_is_written(tmp_path):
    path = plot_pareto(
        TRIALS, tmp_path / "pareto.png", title="t", oracle={"hours": 20.0, "emissions_kg": 0.5}
    )
    assert path.is_file() and path.stat().st_size > 5000


# ------------------------------------------------------------------------------- with Ray Tune


@pytest.mark.slow
def test_simulator_sweep_end_to_end(ray_cluster, tmp_path):
    import curtail

    result = curtail.sweep(paper_with_sweep(**SMALL_SWEEP), output_dir=tmp_path)
    trials = result.trials
    assert result.num_trials == 3 and set(trials["policy"]) == {"threshold", "budget"}
    for key in METRICS:
        assert trials[key].notna().all(), key
    # the cleaner price wins among the budget trials that met the budget
    assert result.best["policy"]["kind"] == "budget" and result.best["completed"]
    assert result.best["emissions_kg"] == trials["emissions_kg"][trials["completed"]].min()
    assert {"trials", "best", "pareto", "generalisation"} <= set(result.files)
    assert all(path.is_file() for path in result.files.values())
    assert json.loads(result.files["best"].read_text())["num_trials"] == 3
    # Tune was told what to minimise: its ResultGrid picks the same trial
    assert result.grid.get_best_result().metrics["objective"] == result.best["emissions_kg"]
    saved = pd.read_csv(result.files["trials"])
    assert len(saved) == 3 and "config/variant/kind" in saved.columns
    table = result.generalisation
    assert set(table["role"]) == {"chosen", "threshold", "oracle (bound)"}
    assert set(table["run"]) == {"threshold", "forecast"}
    for _, rows in table.groupby("run"):
        by_role = rows.set_index("role")
        assert (
            by_role.loc["oracle (bound)", "emissions_kg"] <= by_role.loc["chosen", "emissions_kg"]
        )


@pytest.mark.slow
def test_an_optuna_sweep_is_restored_with_its_finished_trials(ray_cluster, tmp_path):
    import curtail

    experiment = paper_with_sweep(**{**SMALL_SWEEP, "search": "optuna", "num_samples": 2})
    result = curtail.sweep(experiment, output_dir=tmp_path)
    trials = result.trials
    assert result.num_trials == 6 and set(trials["policy"]) <= {"threshold", "budget"}
    assert result.grid.get_best_result().metrics["objective"] == trials["objective"].iloc[0] == trials["objective"].min()
    assert list((tmp_path / "tune").rglob("searcher-state-*.pkl")), "Optuna's searcher state was not saved"
    # the sweep is restored from its folder: the finished trials are kept, none runs again
    again = curtail.sweep(experiment, output_dir=tmp_path, resume=True)
    assert sorted(again.trials["trial_id"]) == sorted(trials["trial_id"])
    assert again.best["trial_id"] == result.best["trial_id"]


@pytest.mark.slow
def test_runtime_trainable_trains_for_real_in_a_tune_trial(ray_cluster, tmp_path):
    """One Tune trial = one short real run (tiny preset) through curtail.run, with a training
    override (outer learning rate) searched beside the policy."""
    from runtime_fixtures import tiny_experiment

    import curtail

    experiment = tiny_experiment(tmp_path)
    experiment["runs"][0]["deadline"] = "2026-01-11T01:30:00Z"  # a and b overlap: a federated round
    experiment["sweep"] = {
        "tune_run": "two-sites",
        "trainable": "runtime",
        "num_samples": 1,
        "cpus_per_trial": 0.01,  # a trial of 1 CPU (Tune's default) starves its Train workers on 2 cores
        "max_concurrent_trials": 1,
        "policies": [{"kind": "threshold"}],
        "training": {"outer_lr": {"choice": [0.5]}},
    }
    result = curtail.sweep(experiment, output_dir=tmp_path / "sweep")
    row = result.trials.iloc[0]
    assert result.num_trials == 1 and row["policy"] == "threshold"
    assert row["tokens"] > 0 and math.isfinite(row["final_eval_loss"])
    assert row["config/training.outer_lr"] == 0.5
    run_dir = Path(row["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens"] == row["tokens"] and summary["executor"] == "ray"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["training"]["outer_lr"] == 0.5
    assert np.isfinite(summary["final_eval_loss"])
