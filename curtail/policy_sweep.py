"""Ray Tune sweeps over scheduling policies: which policy, with which knobs, on your traces.

One trial is one run of the experiment's ``tune_run`` with a sampled policy (kind and
parameters) and sampled ``rules`` / ``execution`` overrides. The default trainable is the
simulator (milliseconds to a second per trial: hundreds of trials in minutes on a laptop); the
``runtime`` trainable trains for real through :func:`curtail.api.run` (tiny preset, local Ray
cluster, about a minute per trial) and may also search ``training`` fields such as
``outer_lr``. Every trial reports emissions, completion hours, the share of energy inside
windows, window utilisation and tokens trained.

The sweep writes, in its output directory: ``trials.csv`` (Tune's ``ResultGrid`` as a
DataFrame, one row per trial), ``pareto.png`` (emissions vs completion time, Pareto front,
the oracle bound), ``best.json`` (the chosen trial) and ``generalisation.csv`` (the chosen
policy simulated unchanged on ``eval_runs``, another period, beside the oracle there).

    import curtail
    result = curtail.sweep("experiments/sweep_policies.toml")
    result.trials.sort_values("emissions_kg").head()
    result.generalisation

Small machines: Tune gives a trial 1 CPU by default, and on 2 cores two such trials starve
the Train workers a ``runtime`` trial starts (the run waits forever), while 0 CPUs is refused
(no resource request). So trials ask for a fraction of a CPU (``cpus_per_trial``, never 0)
and ``max_concurrent_trials`` bounds them; Ray is started with the machine's CPUs, no
dashboard, if it is not running already.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from curtail.api import as_experiment
from curtail.config import (
    ConfigError,
    CurtailmentRules,
    ExecutionConfig,
    ExperimentConfig,
    RunSpec,
    SearchDomain,
    SweepConfig,
    TrainingConfig,
)
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.simulator import Simulator
from curtail.planning.traces import Forecast, TraceSet
from curtail.runlog import summary_of
from curtail.tracking import check_available, tune_callbacks

METRICS = (
    "emissions_kg",
    "hours",
    "share_energy_in_windows",
    "window_utilisation",
    "tokens",
    "completed",
    "energy_kwh",
    "num_syncs",
)
"""What every trial reports (plus ``policy``, ``policy_params`` and, for real runs, loss)."""

_SECTIONS = {"rules": CurtailmentRules, "execution": ExecutionConfig, "training": TrainingConfig}
OBJECTIVE = "objective"
"""The value Tune minimises (``TuneConfig(metric=OBJECTIVE, mode="min")``): see :func:`objective`."""
MISSED_PENALTY = 1e12
"""Added to the objective of a trial that missed its budget or ``max_hours``: it ranks after every
trial that did not, whatever the metric's unit (kg, hours, kWh)."""


def objective(result: Mapping[str, Any], sweep: SweepConfig) -> float:
    """``sweep.metric`` of a trial's result, plus :data:`MISSED_PENALTY` if it missed the budget
    (with ``require_completed``) or finished after ``max_hours``. Lower is better."""
    missed = (sweep.require_completed and not bool(result["completed"])) or (
        sweep.max_hours is not None and result["hours"] > sweep.max_hours)
    return float(result[sweep.metric]) + (MISSED_PENALTY if missed else 0.0)


# ----------------------------------------------------------------------------- trials


def policy_variants(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Each policy kind with its fixed parameters, crossed with its ``grid`` parameters."""
    variants = []
    for space in sweep.policies:
        fixed = {k: v for k, v in space.params.items() if not isinstance(v, SearchDomain)}
        grids = {
            k: v.grid for k, v in space.params.items() if isinstance(v, SearchDomain) and v.grid
        }
        for values in itertools.product(*grids.values()):
            variants.append({"kind": space.kind, **fixed, **dict(zip(grids, values))})
    return variants


def _tune_domain(domain: SearchDomain) -> Any:
    from ray import tune

    if domain.grid is not None:
        return tune.grid_search(list(domain.grid))
    if domain.choice is not None:
        return tune.choice(list(domain.choice))
    if domain.uniform is not None:
        return tune.uniform(*domain.uniform)
    if domain.loguniform is not None:
        return tune.loguniform(*domain.loguniform)
    assert domain.randint is not None
    return tune.randint(*domain.randint)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's search space: ``variant`` (a grid over :func:`policy_variants`; a choice for
    Optuna, which takes no grids), sampled policy parameters as ``<kind>.<name>``, and
    ``rules.<field>`` / ``execution.<field>`` / ``training.<field>`` overrides."""
    from ray import tune

    variants = policy_variants(sweep)
    space: dict[str, Any] = {
        "variant": tune.choice(variants) if sweep.search == "optuna" else tune.grid_search(variants)}
    for policy in sweep.policies:
        for name, spec in policy.params.items():
            if isinstance(spec, SearchDomain) and spec.grid is None:
                space[f"{policy.kind}.{name}"] = _tune_domain(spec)
    for section in _SECTIONS:
        for name, spec in getattr(sweep, section).items():
            space[f"{section}.{name}"] = (
                _tune_domain(spec) if isinstance(spec, SearchDomain) else spec
            )
    return space


def trial_policy(trial: Mapping[str, Any]) -> dict[str, Any]:
    """The policy config (``kind`` and parameters) a trial's sampled values describe."""
    variant = dict(trial["variant"])
    prefix = f"{variant['kind']}."
    variant.update({k[len(prefix) :]: v for k, v in trial.items() if k.startswith(prefix)})
    return variant


def trial_experiment(
    experiment: ExperimentConfig, run_name: str, trial: Mapping[str, Any]
) -> ExperimentConfig:
    """The experiment reduced to ``run_name`` with a trial's policy and overrides applied.

    Goes through the same validation as a config file, so a sampled value that a field does
    not accept fails the trial with the field's name.
    """
    run = experiment.run(run_name)
    overrides = {
        section: {k.split(".", 1)[1]: v for k, v in trial.items() if k.startswith(f"{section}.")}
        for section in _SECTIONS
    }
    data = experiment.model_dump(mode="json", exclude={"sweep"})
    data["runs"] = [
        {
            **run.model_dump(mode="json"),
            "policy": trial_policy(trial),
            "rules": {**experiment.rules_for(run).model_dump(mode="json"), **overrides["rules"]},
            "execution": {
                **experiment.execution_for(run).model_dump(mode="json"),
                **overrides["execution"],
            },
        }
    ]
    data["training"] = {**data["training"], **overrides["training"]}
    return ExperimentConfig.model_validate(data)


def simulate_one(
    experiment: ExperimentConfig,
    traces: TraceSet,
    forecasts: dict[str, Forecast],
    run: RunSpec | None = None,
) -> dict[str, Any]:
    """Simulate one run (default: the experiment's first) with preloaded traces; its summary."""
    run = run or experiment.runs[0]
    plan = plan_run(experiment, run, traces, forecasts)
    started = time.perf_counter()
    trajectory = Simulator(plan.context, plan.policy).run()
    return summary_of(
        plan, trajectory, executor="simulator", extra={"simulation_s": time.perf_counter() - started}
    )


def _report_metrics(summary: Mapping[str, Any], trial: Mapping[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    policy = trial_policy(trial)
    metrics = {key: summary[key] for key in METRICS}
    metrics["completed"] = bool(metrics["completed"])
    metrics[OBJECTIVE] = objective(metrics, sweep)
    metrics["policy"] = policy["kind"]
    metrics["policy_params"] = json.dumps(
        {k: v for k, v in policy.items() if k != "kind"}, sort_keys=True
    )
    return metrics


def _simulator_trainable(
    trial: dict[str, Any],
    *,
    experiment_data: dict[str, Any],
    sweep_data: dict[str, Any],
    traces: TraceSet,
    forecasts: dict[str, Forecast],
) -> None:
    from ray import tune

    spec = SweepConfig.model_validate(sweep_data)
    experiment = trial_experiment(ExperimentConfig.model_validate(experiment_data), spec.tune_run, trial)
    summary = simulate_one(experiment, traces, forecasts)
    tune.report(_report_metrics(summary, trial, spec))


def _train_for_real(
    experiment_data: dict[str, Any], run_name: str, output_dir: str
) -> dict[str, Any]:
    """One real run (a Ray task outside the trial's placement group); its summary and folder."""
    from curtail.api import run as train_for_real

    result = train_for_real(
        ExperimentConfig.model_validate(experiment_data), run=run_name, output_dir=output_dir
    )
    return {"summary": result.summary, "run_dir": str(result.run_dir)}


def _runtime_trainable(
    trial: dict[str, Any], *, experiment_data: dict[str, Any], sweep_data: dict[str, Any]
) -> None:
    import ray
    from ray import tune

    spec = SweepConfig.model_validate(sweep_data)
    run_name = spec.tune_run
    experiment = trial_experiment(ExperimentConfig.model_validate(experiment_data), run_name, trial)
    trial_dir = Path(tune.get_context().get_trial_dir())
    # Tune captures a trial's children in its placement group (a sliver of a CPU): the run's
    # coordinator, averager and Train worker groups must be scheduled like any real run's.
    task = ray.remote(_train_for_real).options(num_cpus=0, scheduling_strategy="DEFAULT")
    outcome = ray.get(
        task.remote(experiment.model_dump(mode="json"), run_name, str(trial_dir / "runs"))
    )
    metrics = _report_metrics(outcome["summary"], trial, spec)
    metrics["final_eval_loss"] = outcome["summary"].get("final_eval_loss")
    metrics["run_dir"] = outcome["run_dir"]
    tune.report(metrics)


# ----------------------------------------------------------------------------- results


def pareto_front(trials: pd.DataFrame, x: str = "hours", y: str = "emissions_kg") -> pd.DataFrame:
    """Completed trials no other completed trial beats on both ``x`` and ``y`` (lower is better)."""
    done = trials[trials["completed"].astype(bool)].sort_values([x, y])
    keep, best_y = [], math.inf
    for index, row in done.iterrows():
        if row[y] < best_y - 1e-12:
            keep.append(index)
            best_y = row[y]
    return done.loc[keep]


def rank_trials(trials: pd.DataFrame, sweep: SweepConfig) -> pd.DataFrame:
    """Trials best first: by :func:`objective` (those that completed, if required, within
    ``max_hours``, if given, before the others; then by ``metric``), then by hours, then (equal
    trials: the same policy sampled twice) by Tune's trial id, so a restored sweep picks the same."""
    ranked = trials.assign(_objective=[objective(row, sweep) for _, row in trials.iterrows()])
    keys = ["_objective", "hours", *(["trial_id"] if "trial_id" in ranked.columns else [])]
    return ranked.sort_values(keys, kind="stable").drop(columns="_objective")


def plot_pareto(
    trials: pd.DataFrame, path: Path, *, title: str, oracle: Mapping[str, Any] | None = None
) -> Path:
    """Emissions vs completion hours of every trial, coloured by policy, with the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for kind, group in trials.groupby("policy"):
        done = group["completed"].astype(bool)
        axes.scatter(
            group.loc[done, "hours"], group.loc[done, "emissions_kg"], s=14, alpha=0.7, label=kind
        )
        if (~done).any():
            axes.scatter(
                group.loc[~done, "hours"],
                group.loc[~done, "emissions_kg"],
                s=14,
                alpha=0.4,
                marker="x",
                color="grey",
                label=f"{kind} (budget missed)",
            )
    front = pareto_front(trials)
    if len(front):
        axes.step(
            front["hours"],
            front["emissions_kg"],
            where="post",
            color="black",
            lw=1,
            label="Pareto front",
        )
    if oracle is not None:
        axes.scatter(
            [oracle["hours"]],
            [oracle["emissions_kg"]],
            marker="*",
            s=160,
            color="gold",
            edgecolor="black",
            zorder=5,
            label="oracle (perfect foresight)",
        )
    axes.set_xlabel("completion time (h)")
    axes.set_ylabel("emissions (kg CO2)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


@dataclass
class SweepResult:
    """A finished sweep: its trials, the chosen one, and how it did on other periods."""

    experiment: ExperimentConfig
    sweep: SweepConfig
    trials: pd.DataFrame  # one row per trial: METRICS, policy, config/* columns
    best: dict[str, Any]  # the chosen trial: metrics and its policy / override config
    generalisation: pd.DataFrame  # tune and eval runs: chosen policy vs threshold vs oracle
    output_dir: Path
    wall_s: float
    files: dict[str, Path] = field(default_factory=dict)
    grid: Any = None  # Tune's ResultGrid: get_best_result(), each trial's Result and its path

    @property
    def num_trials(self) -> int:
        return len(self.trials)


def _trial_config(row: pd.Series) -> dict[str, Any]:
    """A trial's sampled config back from its DataFrame row (``config/...`` columns)."""
    config: dict[str, Any] = {"variant": {}}
    for column, value in row.items():
        if not isinstance(column, str) or not column.startswith("config/"):
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        value = value.item() if hasattr(value, "item") else value  # numpy scalars -> Python
        key = column[len("config/") :]
        if key.startswith("variant/"):
            config["variant"][key[len("variant/") :]] = value
        else:
            config[key] = value
    return config


def _generalisation(
    experiment: ExperimentConfig,
    sweep: SweepConfig,
    best_trial: Mapping[str, Any],
    traces: TraceSet,
    forecasts: dict[str, Forecast],
) -> pd.DataFrame:
    """The chosen trial, unchanged, on the tune run and every eval run, beside the threshold
    policy and the oracle bound on the same run (both with the run's own rules)."""
    candidates = {
        "chosen": dict(best_trial),
        "threshold": {"variant": {"kind": "threshold"}},
        "oracle (bound)": {"variant": {"kind": "oracle"}},
    }
    rows = []
    for period, name in [("tune", sweep.tune_run)] + [("eval", n) for n in sweep.eval_runs]:
        for role, trial in candidates.items():
            summary = simulate_one(trial_experiment(experiment, name, trial), traces, forecasts)
            policy = trial_policy(trial)
            rows.append(
                {
                    "period": period,
                    "run": name,
                    "role": role,
                    "policy": policy["kind"],
                    "policy_params": json.dumps(
                        {k: v for k, v in policy.items() if k != "kind"}, sort_keys=True
                    ),
                    "start": summary["start"],
                    **{key: summary[key] for key in METRICS},
                }
            )
    return pd.DataFrame(rows)


def sweep(
    config: ExperimentConfig | str | Path | dict[str, Any],
    *,
    num_samples: int | None = None,
    trainable: str | None = None,
    output_dir: str | Path | None = None,
    max_concurrent_trials: int | None = None,
    cpus_per_trial: float | None = None,
    search: str | None = None,
    resume: bool = False,
    verbose: int = 0,
) -> SweepResult:
    """Run the experiment's ``[sweep]`` with Ray Tune; write and return the results.

    Tune minimises :data:`OBJECTIVE` (see :func:`objective`); the result keeps Tune's
    ``ResultGrid`` (``result.grid.get_best_result()`` is the chosen trial).

    Args:
        config: an experiment with a ``sweep`` section (TOML path, dict or object).
        num_samples, trainable, max_concurrent_trials, cpus_per_trial, search: override the
            ``[sweep]`` values.
        output_dir: where the results go (default ``<output_dir>/<experiment>/sweep``).
        resume: continue the sweep Tune left in ``output_dir`` (after a crash or Ctrl-C:
            finished trials are kept, unfinished and errored ones run again); a fresh sweep if
            there is none.
        verbose: Tune's verbosity (0 quiet).
    """
    import ray
    from ray import tune

    experiment = as_experiment(config)
    if experiment.sweep is None:
        raise ConfigError(
            f"experiment {experiment.name!r} has no [sweep] section; add one (see experiments/sweep_policies.toml)"
        )
    updates = {
        key: value
        for key, value in {
            "num_samples": num_samples,
            "trainable": trainable,
            "max_concurrent_trials": max_concurrent_trials,
            "cpus_per_trial": cpus_per_trial,
            "search": search,
        }.items()
        if value is not None
    }
    spec = SweepConfig.model_validate({**experiment.sweep.model_dump(), **updates})
    out = (
        Path(output_dir)
        if output_dir is not None
        else experiment.output_dir / experiment.name / "sweep"
    )
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_available(experiment.tracking)
    traces, forecasts = load_experiment_traces(experiment)
    experiment_data = experiment.model_dump(mode="json", exclude={"sweep"})
    # fail before any trial if the space does not make valid runs
    first = {"variant": policy_variants(spec)[0]}
    trial_experiment(experiment, spec.tune_run, first)
    search_alg = _search_algorithm(spec)  # and before Ray starts if its package is missing

    # a trial is one small result: of Tune's per-trial CSV, JSON and TensorBoard files only
    # the JSON one is needed (ResultGrid.get_dataframe reads it); the others cost more than
    # a simulation
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    started_ray = False
    if not ray.is_initialized():
        if spec.trainable == "runtime":
            from curtail.runtime.cluster import connect

            started_ray = connect(
                experiment.run(spec.tune_run).sites,
                workers_per_site=experiment.training.workers_per_site,
            )
        else:
            ray.init(
                num_cpus=os.cpu_count() or 2,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=256 * 2**20,
                namespace="curtail-sweep",
            )
            started_ray = True
    started = time.perf_counter()
    try:
        sweep_data = spec.model_dump(mode="json")
        if spec.trainable == "simulator":
            function = tune.with_parameters(
                _simulator_trainable,
                experiment_data=experiment_data,
                sweep_data=sweep_data,
                traces=traces,
                forecasts=forecasts,
            )
        else:
            function = tune.with_parameters(_runtime_trainable, experiment_data=experiment_data, sweep_data=sweep_data)
        trainable_fn = tune.with_resources(function, {"CPU": spec.cpus_per_trial})
        name = f"{experiment.name}-sweep"
        from ray.tune.logger import JsonLoggerCallback

        # [tracking]: Tune's TensorBoard and MLflow logger callbacks, one MLflow run per trial
        with tune_callbacks(experiment.tracking, out, name) as trackers:
            previous = out / "tune" / name
            if resume and tune.Tuner.can_restore(previous):
                tuner = tune.Tuner.restore(str(previous), trainable=trainable_fn, resume_errored=True,
                                           restart_errored=False)
            else:
                tuner = tune.Tuner(
                    trainable_fn,
                    param_space=param_space(spec),
                    tune_config=tune.TuneConfig(
                        metric=OBJECTIVE,
                        mode="min",
                        num_samples=_num_samples(spec),
                        search_alg=search_alg,
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=name,
                        storage_path=str(out / "tune"),
                        verbose=verbose,
                        callbacks=[JsonLoggerCallback(), *trackers],
                    ),
                )
            grid = tuner.fit()
        wall_s = time.perf_counter() - started
        trials = grid.get_dataframe()
    finally:
        if started_ray:
            ray.shutdown()
    if grid.num_errors:
        raise RuntimeError(
            f"{grid.num_errors} of {len(grid)} trials failed; first error: {grid.errors[0]}"
        )
    trials = rank_trials(trials, spec).reset_index(drop=True)
    best_row = trials.iloc[0]
    best_trial = _trial_config(best_row)
    best = {
        "policy": trial_policy(best_trial),
        "overrides": {
            k: v
            for k, v in best_trial.items()
            if k != "variant" and "." in k and k.split(".")[0] in _SECTIONS
        },
        **{
            key: (bool(best_row[key]) if key == "completed" else float(best_row[key]))
            for key in METRICS
        },
        "trial_id": str(best_row.get("trial_id", "")),
    }
    files = {"trials": out / "trials.csv", "best": out / "best.json"}
    trials.to_csv(files["trials"], index=False)
    generalisation = pd.DataFrame()
    if spec.trainable == "simulator":
        generalisation = _generalisation(experiment, spec, best_trial, traces, forecasts)
        files["generalisation"] = out / "generalisation.csv"
        generalisation.to_csv(files["generalisation"], index=False)
    oracle = None
    if len(generalisation):
        tune_oracle = generalisation[
            (generalisation["period"] == "tune") & (generalisation["role"] == "oracle (bound)")
        ]
        oracle = tune_oracle.iloc[0].to_dict() if len(tune_oracle) else None
    files["pareto"] = plot_pareto(
        trials,
        out / "pareto.png",
        title=f"{experiment.name}: {len(trials)} trials on {spec.tune_run}",
        oracle=oracle,
    )
    files["best"].write_text(
        json.dumps(
            {**best, "wall_s": wall_s, "num_trials": len(trials), "trainable": spec.trainable},
            indent=2,
            default=str,
        )
    )
    return SweepResult(experiment, spec, trials, best, generalisation, out, wall_s, files, grid)


def _num_samples(sweep: SweepConfig) -> int:
    """Tune's ``num_samples``: per grid point for the random search (the variants are a grid),
    the same number of trials in all for Optuna (the variants are one of its choices)."""
    return sweep.num_samples * (len(policy_variants(sweep)) if sweep.search == "optuna" else 1)


def _search_algorithm(sweep: SweepConfig) -> Any:
    """Tune's search algorithm for ``sweep.search``, at most ``max_concurrent_trials`` at once."""
    if sweep.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)
    try:
        import optuna  # noqa: F401  (Tune's OptunaSearch imports it only when built)
    except ImportError:
        raise ConfigError("sweep.search = \"optuna\" needs Optuna: pip install 'curtail[sweep]'") from None
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(metric=OBJECTIVE, mode="min", seed=sweep.seed),
                              max_concurrent=sweep.max_concurrent_trials)
