"""The Python API: ``curtail.simulate`` (fast simulator) and ``curtail.run`` (real training on Ray).

Notebook use::

    import curtail
    result = curtail.simulate("experiments/paper.toml")
    result.table()            # comparison as a pandas DataFrame
    result.run_dirs           # one run directory per run

    trained = curtail.run("experiments/demo.toml")    # local Ray cluster, real model, minutes
    trained.summary["final_eval_loss"], trained.run_dir / "model"
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from curtail.config import ExperimentConfig, load_experiment, parse_experiment, project_root
from curtail.planning.energy import PowerModel
from curtail.planning.plan import RunPlan, load_experiment_traces, plan_run
from curtail.planning.simulator import Simulator
from curtail.planning.summary import summarize, timeseries
from curtail.planning.trajectory import Trajectory
from curtail.runlog import (
    RunRecord,
    events_frame,
    intervals_frame,
    losses_frame,
    modes_frame,
    package_versions,
    write_run_dir,
)
from curtail.tracking import check_available, log_run

SUMMARY_COLUMNS = [
    "run",
    "policy",
    "sites",
    "completed",
    "tokens",
    "hours",
    "energy_kwh",
    "emissions_kg",
    "share_energy_in_windows",
    "window_utilisation",
    "num_syncs",
]


@dataclass
class SimulationResult:
    """All runs of one ``simulate`` call."""

    experiment: ExperimentConfig
    records: list[RunRecord]

    @property
    def summaries(self) -> list[dict[str, Any]]:
        return [r.summary for r in self.records]

    @property
    def run_dirs(self) -> list[Path]:
        return [r.path for r in self.records if r.path is not None]

    def summary(self, run: str) -> dict[str, Any]:
        for record in self.records:
            if record.summary["run"] == run:
                return record.summary
        raise KeyError(f"no run {run!r}; runs: {[r.summary['run'] for r in self.records]}")

    def table(self) -> pd.DataFrame:
        """One row per run with the headline columns (mode hours appended)."""
        rows = []
        for s in self.summaries:
            row = {key: s[key] for key in SUMMARY_COLUMNS}
            row["sites"] = "+".join(s["sites"])
            row.update({f"{mode.lower()}_h": hours for mode, hours in s["mode_hours"].items()})
            reference = s.get("reference") or {}
            row["reference_emissions_kg"] = reference.get("emissions_kg")
            row["reference_share_energy_in_windows"] = reference.get("share_energy_in_windows")
            row["reference_hours"] = reference.get("hours")
            rows.append(row)
        return pd.DataFrame(rows)


def as_experiment(config: ExperimentConfig | str | Path | dict[str, Any]) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return parse_experiment(config, base_dir=Path.cwd())
    return load_experiment(config)


def record_of(plan: RunPlan, trajectory: Trajectory, config: ExperimentConfig, *, executor: str, traces_checksums: dict[str, str], extra: dict[str, Any] | None = None) -> RunRecord:
    """Account a trajectory (simulated or real) into a run record."""
    summary = summarize(
        trajectory,
        run=plan.run.name,
        policy=plan.policy_label,
        regions=plan.regions,
        power=plan.power,
        signals=plan.signals,
        calendar=plan.calendar,
        token_budget=plan.context.token_budget,
        executor=executor,
        extra=extra,
    )
    manifest = {
        "executor": executor,
        "experiment": config.name,
        "run": plan.run.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "trace_checksums_sha256": traces_checksums,
    }
    return RunRecord(
        summary=summary,
        events=events_frame(trajectory),
        intervals=intervals_frame(trajectory),
        modes=modes_frame(trajectory),
        timeseries=timeseries(trajectory, plan.power, plan.signals),
        manifest=manifest,
    )


def _with_measured_power(plan: RunPlan, config: ExperimentConfig, per_gpu_w: dict[str, float]) -> tuple[RunPlan, dict[str, Any]]:
    """With ``training.power = "measured"``, account each site's training at its measured watts
    per GPU times its ``num_gpus``; sites without readings (no NVML) keep the modelled power."""
    if config.training.power == "model":
        return plan, {"power_source": "model"}
    power = dict(plan.power)
    measured = {}
    for site, watts in per_gpu_w.items():
        measured[site] = watts * config.sites[site].num_gpus
        power[site] = PowerModel(training_w=measured[site], idle_w=plan.power[site].idle_w)
    missing = sorted(set(plan.power) - set(measured))
    note: dict[str, Any] = {"power_source": "measured" if not missing else "measured where available",
                            "measured_training_power_w": measured}
    if missing:
        note["power_warning"] = (
            f"no NVML power readings for {', '.join(missing)} (no GPU, or nvidia-ml-py missing): "
            "their training power is the configured model"
        )
    return dataclasses.replace(plan, power=power), note


def simulate(
    config: ExperimentConfig | str | Path | dict[str, Any],
    *,
    runs: Iterable[str] | None = None,
    output_dir: str | Path | None = None,
    write: bool = True,
) -> SimulationResult:
    """Simulate every run of an experiment (or the named ones) and write their run directories.

    Args:
        config: an :class:`ExperimentConfig`, a TOML path, or a config dict.
        runs: names of runs to simulate (default: all).
        output_dir: root for run directories (default: the config's ``output_dir``);
            each run goes to ``output_dir/<experiment>/<run>``.
        write: set False to keep everything in memory (and log nothing to ``[tracking]``).
    """
    experiment = as_experiment(config)
    if write:
        check_available(experiment.tracking)
    traces, forecasts = load_experiment_traces(experiment)
    selected = [experiment.run(name) for name in runs] if runs is not None else list(experiment.runs)
    root = Path(output_dir) if output_dir is not None else experiment.output_dir
    records = []
    for run in selected:
        plan = plan_run(experiment, run, traces, forecasts)
        started = time.perf_counter()
        trajectory = Simulator(plan.context, plan.policy).run()
        record = record_of(
            plan,
            trajectory,
            experiment,
            executor="simulator",
            traces_checksums=traces.checksums,
            extra={
                "simulation_s": time.perf_counter() - started,
                "reference": run.reference.model_dump() if run.reference else None,
            },
        )
        if write:
            write_run_dir(record, root / experiment.name / run.name)
            log_run(record, experiment.tracking)
        records.append(record)
    return SimulationResult(experiment, records)


DEFAULT_RUN_CONFIG = "experiments/demo.toml"
RUN_SPEC_FILE = "run.json"  # the experiment and run name, written when a real run starts (for --resume)


@dataclass
class RunResult:
    """A real run: its summary, run directory and record."""

    summary: dict[str, Any]
    run_dir: Path
    record: RunRecord

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def _fresh_run_dir(root: Path, experiment: str, run: str) -> Path:
    """``root/experiment/run``; a real run never overwrites another: a time suffix if taken."""
    path = root / experiment / run
    if path.exists() and any(path.iterdir()):
        path = root / experiment / f"{run}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def run(
    config: ExperimentConfig | str | Path | dict[str, Any] | None = None,
    *,
    run: str | None = None,
    output_dir: str | Path | None = None,
    address: str | None = None,
    resume: str | Path | None = None,
    max_restarts: int = 2,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    progress_interval_s: float = 2.0,
) -> RunResult:
    """Train for real on Ray, following the curtailment calendar; write the run directory.

    Args:
        config: experiment (default: ``experiments/demo.toml``: 3 sites on the paper trace,
            the ``small`` preset on Tiny Shakespeare).
        run: which of the experiment's runs (default: its first).
        output_dir: root of run directories (default: the config's ``output_dir``).
        address: a Ray cluster to join (default: ``RAY_ADDRESS``, else a local cluster that
            declares one resource per site).
        resume: a run directory to continue from its last checkpoint (config and run name are
            read from it; ``config`` and ``run`` must then be left out).
        max_restarts: if the coordinator or the averaging actor dies, resume from the last
            checkpoint this many times before giving up.
        on_progress: called every ``progress_interval_s`` with the coordinator's progress
            (clock, mode, active sites, tokens, loss, process ids).
    """
    import ray

    from curtail.runtime.checkpoint import latest_checkpoint
    from curtail.runtime.cluster import connect, remove_stale_placement_groups
    from curtail.runtime.coordinator import HEAD_NODE, Coordinator

    if resume is not None:
        if config is not None or run is not None:
            raise ValueError("resume=RUN_DIR reads the config and run name from the run directory; pass neither")
        run_dir = Path(resume).resolve()
        saved = run_dir / RUN_SPEC_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"{run_dir} has no {RUN_SPEC_FILE}: not a directory written by curtail run")
        spec_data = json.loads(saved.read_text())
        experiment, run = as_experiment(spec_data["experiment"]), spec_data["run"]
    else:
        if config is None:
            local = Path(DEFAULT_RUN_CONFIG)
            config = local if local.is_file() else project_root() / DEFAULT_RUN_CONFIG
        experiment = as_experiment(config)
    spec = experiment.run(run) if run is not None else experiment.runs[0]
    check_available(experiment.tracking)  # before any training: a missing package names its pip command
    traces, forecasts = load_experiment_traces(experiment)
    plan = plan_run(experiment, spec, traces, forecasts)  # validates before any cluster starts
    if resume is None:
        root = Path(output_dir) if output_dir is not None else experiment.output_dir
        run_dir = _fresh_run_dir(root, experiment.name, spec.name).resolve()
        (run_dir / RUN_SPEC_FILE).write_text(
            json.dumps({"experiment": experiment.model_dump(mode="json"), "run": spec.name}, indent=2)
        )
    started_ray = connect(
        list(spec.sites), address=address, workers_per_site=experiment.training.workers_per_site
    )
    restarts = []
    try:
        resuming = resume is not None
        while True:
            coordinator = Coordinator.options(resources=HEAD_NODE).remote(
                experiment.model_dump(mode="json"), spec.name, str(run_dir), resuming
            )
            pending = coordinator.run.remote()
            try:
                while True:
                    done, _ = ray.wait([pending], timeout=progress_interval_s)
                    if done:
                        break
                    if on_progress is not None:
                        on_progress(ray.get(coordinator.progress.remote()))
                artifacts = ray.get(pending)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                checkpoint = latest_checkpoint(run_dir)
                if len(restarts) >= max_restarts or checkpoint is None:
                    raise
                ray.kill(coordinator)
                removed = remove_stale_placement_groups(spec.sites)
                restarts.append({"error": str(error).splitlines()[0][:300], "checkpoint": checkpoint.name,
                                 "stale_placement_groups_removed": removed})
                resuming = True
        ray.kill(coordinator)
    finally:
        if started_ray:
            ray.shutdown()
    plan, power_note = _with_measured_power(plan, experiment, artifacts.summary_extra["measured_power_per_gpu_w"])
    record = record_of(
        plan,
        artifacts.trajectory,
        experiment,
        executor="ray",
        traces_checksums=traces.checksums,
        extra={**artifacts.summary_extra, **power_note, "restarts": restarts, "resumed": resume is not None,
               "reference": spec.reference.model_dump() if spec.reference else None},
    )
    record.manifest["training"] = experiment.training.model_dump(mode="json")
    record.losses = losses_frame(artifacts.trajectory)
    record.timings = pd.DataFrame([vars(t) for t in artifacts.timings])
    write_run_dir(record, run_dir)
    log_run(record, experiment.tracking)  # TensorBoard / MLflow, if [tracking] turns them on
    return RunResult(record.summary, run_dir, record)
