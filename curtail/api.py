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
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from curtail.config import (
    ExperimentConfig,
    RunSpec,
    TrainingConfig,
    load_experiment,
    parse_experiment,
)
from curtail.errors import CurtailError, PreflightError, ResumeError
from curtail.examples import example_config
from curtail.live_tracking import LiveTracker
from curtail.planning.energy import PowerModel
from curtail.planning.live_calendar import AppliedReading, signals_from_readings
from curtail.planning.plan import RunPlan, load_experiment_traces, plan_recorded, plan_run
from curtail.planning.provisioning import CAPACITY_FILE, measured_provisioning_of
from curtail.planning.simulator import Simulator
from curtail.preflight import check_live_files, check_output_dir, check_run_files, unwritable_dir
from curtail.run_store import RunStore, is_uri, join
from curtail.runlog import RunRecord, events_frame, losses_frame, record_of, write_run_dir
from curtail.sources.live_feed import READINGS_FILE, read_readings
from curtail.sources.live_forecasts import (
    FORECASTS_FILE,
    ReceivedForecast,
    forecasts_from_records,
    read_forecasts,
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


def _with_measured_power(plan: RunPlan, config: ExperimentConfig, per_gpu_w: dict[str, float],
                         host_w: dict[str, dict[str, float]]) -> tuple[RunPlan, dict[str, Any]]:
    """With ``training.power = "measured"``, account each site's training at its measured watts
    per GPU times its ``num_gpus`` and ``pue``; sites without readings (no NVML) keep the modelled
    power. With ``training.host_power = "codecarbon"`` the site's workers' measured CPU and memory
    watts (times ``pue``) are added to its training power."""
    power = dict(plan.power)
    note: dict[str, Any] = {"power_source": "model"}
    if config.training.power == "measured":
        measured = {}
        for site, watts in per_gpu_w.items():
            measured[site] = watts * config.sites[site].num_gpus * config.sites[site].pue
            power[site] = PowerModel(training_w=measured[site], idle_w=plan.power[site].idle_w)
        missing = sorted(set(plan.power) - set(measured))
        note = {"power_source": "measured" if not missing else "measured where available",
                "measured_training_power_w": measured}
        if missing:
            note["power_warning"] = (
                f"no NVML power readings for {', '.join(missing)} (no GPU, or nvidia-ml-py missing): "
                "their training power is the configured model"
            )
    if config.training.host_power == "codecarbon":
        for site, watts in host_w.items():
            added_w = (watts["cpu_w"] + watts["ram_w"]) * config.sites[site].pue
            power[site] = PowerModel(training_w=power[site].training_w + added_w, idle_w=power[site].idle_w)
        note |= {"host_power_source": "codecarbon", "measured_host_power_w": host_w}
        if missing := sorted(set(plan.power) - set(host_w)):
            note["host_power_warning"] = f"no CodeCarbon host power readings for {', '.join(missing)}"
    return dataclasses.replace(plan, power=power), note


def _measured_provisioning(plan: RunPlan, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A real run's site start-ups as measured (``site_capacity.csv``): their idle kWh and kg
    beside the model's, and the run's energy and emissions with the measured ones instead."""
    windows_file = run_dir / CAPACITY_FILE
    if not windows_file.is_file():
        return {}
    measured = measured_provisioning_of(plan, pd.read_csv(windows_file))
    return {
        "provisioning_measured": measured,
        "energy_kwh_measured_provisioning": summary["energy_kwh"] + measured["total"]["difference_kwh"],
        "emissions_kg_measured_provisioning": summary["emissions_kg"] + measured["total"]["difference_kg"],
    }


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
    if experiment.live is not None:
        raise CurtailError(
            f"experiment {experiment.name!r} follows a live signal ([live]): run it with curtail run; "
            "simulate a finished live run on what it recorded with curtail replay RUN_DIR"
        )
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


DECISION_EVENTS = ("provision", "nodes_ready", "ready", "drain", "round_start", "round_end", "sync", "join_round",
                   "leave_round")
"""The events a policy's decisions and the state machine make (what a replay must reproduce)."""


def decisions(events: pd.DataFrame) -> list[tuple[float, str, str]]:
    """``(t_s, site, event)`` of a run's :data:`DECISION_EVENTS`, in order (an ``events.csv`` frame)."""
    rows = events[events["event"].isin(DECISION_EVENTS)]
    return list(zip(rows["t_s"].astype(float), rows["site"].astype(str), rows["event"].astype(str)))


def replay(run_dir: str | Path, *, write: bool = True) -> RunRecord:
    """Simulate a finished live run on the signal it recorded (``live_readings.jsonl``).

    The simulator follows the same policy over the same readings, taking effect when the run
    learnt them, from the run's start to its end: its provision / drain / round decisions are the
    run's (``tests/test_live_run.py``), so a live run can be audited and other policies compared on
    its signal. The summary says whether they are (``decisions_match_run``, ``first_difference``),
    up to the run's end: on the real-time clock a run trains at its hardware's pace and may reach its
    budget before the simulator's ``tokens_per_s`` would. Stretches the run was down (``lost_time``
    events) are left out as the run left them out.
    Written to ``RUN_DIR/replay/`` unless ``write=False``.
    """
    run_dir = Path(run_dir)
    saved, summary = run_dir / RUN_SPEC_FILE, run_dir / "summary.json"
    if not saved.is_file() or not summary.is_file():
        raise CurtailError(f"{run_dir}: not a finished run directory (needs {RUN_SPEC_FILE} and summary.json)")
    spec_data = json.loads(saved.read_text())
    experiment = ExperimentConfig.model_validate(spec_data["experiment"])
    if experiment.live is None:
        raise CurtailError(f"{run_dir} followed trace files, not a live signal: re-simulate it with curtail simulate")
    spec = experiment.run(spec_data["run"])
    live = json.loads(summary.read_text()).get("live")
    if not live:
        raise CurtailError(f"{run_dir}/summary.json has no 'live' section: the run did not finish as a live run")
    plan = _recorded_plan(experiment, spec, read_readings(run_dir), read_forecasts(run_dir),
                          float(live["start_s"]), float(live["finish_s"]))
    events = pd.read_csv(run_dir / "events.csv", keep_default_na=False)
    trajectory = Simulator(plan.context, plan.policy).run(lost_time=lost_time(events))
    # the run trained at its hardware's pace, the simulator at tokens_per_s: compare up to the run's end
    finish_s = float(live["finish_s"])
    replayed = [d for d in decisions(events_frame(trajectory)) if d[0] < finish_s - 1e-6]  # the run decides nothing at its end
    original = decisions(events)
    differ = next((i for i, (a, b) in enumerate(zip(replayed, original)) if a != b), None)
    if differ is None and len(replayed) != len(original):
        differ = min(len(replayed), len(original))
    record = record_of(plan, trajectory, experiment, executor="simulator", traces_checksums={}, extra={
        "replay_of": str(run_dir), "decisions": len(replayed), "decisions_match_run": differ is None,
        "first_difference": None if differ is None else {
            "replay": replayed[differ] if differ < len(replayed) else None,
            "run": original[differ] if differ < len(original) else None,
        },
    })
    if write:
        write_run_dir(record, run_dir / "replay")
    return record


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


class RunInterrupted(Exception):
    """A real run stopped before its end on request (Ctrl-C): ``checkpoint`` is the folder
    name of its newest checkpoint (None if it wrote none), ``graceful`` whether it stopped at a
    safe point after writing that checkpoint (False after a second Ctrl-C or a failure while
    stopping: then the work since that checkpoint is trained again on resume)."""

    def __init__(self, run_dir: Path, checkpoint: str | None, *, graceful: bool = True, resumable: bool = True,
                 location: str | None = None):
        self.run_dir = Path(run_dir)
        self.location = location or str(self.run_dir)  # where the run lives (a URI for object storage)
        self.checkpoint = checkpoint
        self.graceful = graceful
        if checkpoint is None:
            where = "before its first checkpoint"
        elif graceful:
            where = f"at a safe point, checkpoint {checkpoint} written"
        else:
            where = f"at once; its last checkpoint is {checkpoint}"
        then = (f"continue with: {self.resume_command}" if resumable
                else "nothing to resume from: start a new run")
        super().__init__(f"run interrupted {where}; {then}")

    @property
    def resume_command(self) -> str:
        return f"curtail run --resume {self.location}"


def _averager_resources(training: TrainingConfig) -> dict[str, float]:
    """What a local cluster declares for ``training.averager_resource``: a unit per averaging actor."""
    return {training.averager_resource: training.averager_actors} if training.averager_resource else {}


def _new_run_dir(root: str | Path, experiment: ExperimentConfig, run: str) -> RunStore:
    """``root/experiment/run`` (a folder, or a URI with its working copy) with ``run.json`` in it;
    a real run never overwrites another: a time suffix if taken."""
    store = RunStore.at(join(str(root), experiment.name, run))
    try:
        if store.exists():
            store = RunStore.at(join(str(root), experiment.name, f"{run}-{datetime.now(UTC):%Y%m%d-%H%M%S}"))
        if store.remote is not None:
            shutil.rmtree(store.local, ignore_errors=True)  # a stale working copy: the URI holds nothing
        store.local.mkdir(parents=True, exist_ok=False)
    except OSError as error:
        raise PreflightError(f"output_dir: cannot create {store.local} ({error.strerror or error}); choose another "
                             "output folder (--output-dir DIR)") from None
    (store.local / RUN_SPEC_FILE).write_text(
        json.dumps({"experiment": experiment.model_dump(mode="json"), "run": run}, indent=2)
    )
    store.push(RUN_SPEC_FILE)
    return RunStore(store.local.resolve(), store.remote)


def _differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(given, dict):
        return [d for key in sorted(set(saved) | set(given), key=str)
                for d in _differences(saved.get(key), given.get(key), f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(saved, list) and isinstance(given, list) and len(saved) == len(given):
        return [d for index, (a, b) in enumerate(zip(saved, given)) for d in _differences(a, b, f"{prefix}.{index}")]
    return [] if saved == given else [prefix or "(the whole config)"]


def _resume_target(
    resume: str | Path, config: ExperimentConfig | str | Path | dict[str, Any] | None, run: str | None,
    output_dir: str | Path | None,
) -> tuple[Path, ExperimentConfig, RunSpec]:
    """The run directory to resume, its experiment and run, checked; refuses (changing nothing)
    a completed run and a config or run name that differ from the run's own."""
    run_dir = Path(resume).resolve()
    saved = run_dir / RUN_SPEC_FILE
    if not run_dir.is_dir():
        raise ResumeError(f"{run_dir}: no such run directory")
    if not saved.is_file():
        raise ResumeError(f"{run_dir} has no {RUN_SPEC_FILE}: not a run directory written by curtail run")
    if (run_dir / "summary.json").is_file():
        raise ResumeError(f"{run_dir} is a completed run (it has summary.json): there is nothing to resume, and "
                          "it was left unchanged; start a new run with curtail run CONFIG")
    if output_dir is not None:
        raise ResumeError(f"an output folder does not apply to a resume: the run continues in {run_dir}")
    data = json.loads(saved.read_text())
    experiment = parse_experiment(data["experiment"], source=str(saved))
    if config is not None:
        differing = _differences(data["experiment"], as_experiment(config).model_dump(mode="json"))
        if differing:
            shown = ", ".join(differing[:5]) + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
            raise ResumeError(
                f"the config differs from the one {run_dir} was started with ({RUN_SPEC_FILE}) at {shown}: a "
                "resume continues the run as it was configured. Leave the config out (curtail run --resume "
                "RUN_DIR), or start a new run with the new config"
            )
    if run is not None and run != data["run"]:
        raise ResumeError(f"{run_dir} is run {data['run']!r}, not {run!r}: leave --run out to resume it")
    return run_dir, experiment, experiment.run(data["run"])


def run(
    config: ExperimentConfig | str | Path | dict[str, Any] | None = None,
    *,
    run: str | None = None,
    output_dir: str | Path | None = None,
    address: str | None = None,
    resume: str | Path | None = None,
    checkpoint: int | str | None = None,
    max_restarts: int = 2,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    progress_interval_s: float = 2.0,
) -> RunResult:
    """Train for real on Ray, following the curtailment calendar; write the run directory.

    Everything the run needs is checked before it starts (the config, its traces and data
    files, the output folder, then the cluster's resources: :class:`PreflightError` naming the
    key); a run folder is created only once those checks pass.

    Args:
        config: experiment (default: ``experiments/demo.toml``: 3 sites on the paper trace,
            the ``small`` preset on Tiny Shakespeare). With ``resume``: optional, and refused
            if it differs from the config the run was started with.
        run: which of the experiment's runs (default: its first).
        output_dir: root of run directories (default: the config's ``output_dir``): a folder,
            or a URI ``pyarrow.fs`` opens (``s3://bucket/runs``; see :mod:`curtail.run_store`).
        address: a Ray cluster to join (default: ``RAY_ADDRESS``, else a local cluster that
            declares one resource per site).
        resume: a run directory (a folder or a URI) to continue (config and run name are read from it) from its
            newest intact checkpoint; the ones skipped, and why, go to ``summary.json``
            (``resume_checkpoint``, ``skipped_checkpoints``). A completed run is refused.
        checkpoint: with ``resume``, continue from this checkpoint (``4`` or ``"000004"``).
        max_restarts: if the coordinator or the averaging actor dies, resume from the newest
            intact checkpoint this many times before giving up.
        on_progress: called every ``progress_interval_s`` with the coordinator's progress
            (clock, mode, active sites, tokens, loss, process ids).

    Raises:
        RunInterrupted: on Ctrl-C (``KeyboardInterrupt``) the run stops at its next safe
            point after writing a checkpoint (a second Ctrl-C stops it at once); nothing else
            is written, and ``curtail run --resume RUN_DIR`` continues it.
    """
    import ray

    # Everything the driver runs is imported before Ray connects: under `ray job submit`, a
    # module of the job's working directory first imported after ray.init() was not found
    # (ModuleNotFoundError; tests/test_multinode.py).
    import curtail.runtime.coordinator  # noqa: F401
    from curtail.runtime.checkpoint import point_latest, select_checkpoint
    from curtail.runtime.cluster import (
        check_capacity,
        connect,
        object_store_bytes,
        remove_stale_placement_groups,
    )
    from curtail.runtime.placement import SitePinning
    from curtail.training.model import get_spec

    if checkpoint is not None and resume is None:
        raise ResumeError("a checkpoint is picked for a resume: pass resume=RUN_DIR (--resume RUN_DIR) too")
    store: RunStore | None = None
    if resume is not None:
        if is_uri(resume):  # any machine may continue a run on object storage: pull its working copy
            store = RunStore.at(str(resume))
            store.pull()
        run_dir, experiment, spec = _resume_target(store.local if store else resume, config, run, output_dir)
        store = store or RunStore.at(run_dir)
        if problem := unwritable_dir(run_dir):
            raise PreflightError(f"cannot resume {run_dir}: {problem} (a resume writes its checkpoints and "
                                 "results there)")
        start_from, skipped = select_checkpoint(run_dir, checkpoint)
    else:
        if config is None:
            config = example_config(DEFAULT_RUN_CONFIG)
        experiment = as_experiment(config)
        spec = experiment.run(run) if run is not None else experiment.runs[0]
        root = output_dir if output_dir is not None else experiment.output_dir
        if is_uri(root):
            RunStore.at(join(str(root), experiment.name)).exists()  # reachable, before any cluster starts
        else:
            check_output_dir(Path(root) / experiment.name)
        run_dir, start_from, skipped = None, None, []
    check_available(experiment.tracking)  # before any training: a missing package names its pip command
    check_run_files(experiment)
    if experiment.live is not None:
        check_live_files(experiment)
        # a restart or resume goes on at the grid's now: the stretch since the checkpoint is lost time
        plan: RunPlan | None = None  # accounted on the signal the run records
        traces_checksums: dict[str, str] = {}
    else:
        traces, forecasts = load_experiment_traces(experiment)
        plan = plan_run(experiment, spec, traces, forecasts)  # validates before any cluster starts
        traces_checksums = traces.checksums
    started_ray = connect(
        list(spec.sites), address=address, workers_per_site=experiment.training.workers_per_site,
        object_store_memory_bytes=object_store_bytes(get_spec(experiment.training.preset).num_parameters(),
                                                     len(spec.sites)),
        local_resources=_averager_resources(experiment.training),
        autoscaled_sites=experiment.training.autoscaled_sites,
        pinning=SitePinning(experiment.training.site_pinning),
    )
    try:
        check_capacity(spec.sites, experiment.training)
        if store is None:
            store = _new_run_dir(root, experiment, spec.name)
            run_dir = store.local
        else:  # a killed driver may have left its sites' worker groups reserved
            remove_stale_placement_groups(spec.sites, SitePinning(experiment.training.site_pinning))
            if start_from is not None:
                point_latest(run_dir, start_from)  # the run's state descends from it now
        live = LiveTracker.start(experiment.tracking, run_dir, experiment.name, spec.name)  # [tracking] while it trains
        try:
            artifacts, restarts = _train(experiment, spec, store, start_from, max_restarts=max_restarts,
                                         on_progress=_reporting_to(live, on_progress),
                                         progress_interval_s=progress_interval_s)
        except BaseException:
            if live is not None:
                live.close(failed=True)
            raise
        mlflow_run_id = live.close() if live is not None else None
    finally:
        if started_ray:
            ray.shutdown()
    live_note: dict[str, Any] = {}
    if plan is None:
        readings, forecasts = read_readings(run_dir), read_forecasts(run_dir)
        plan = _recorded_plan(experiment, spec, readings, forecasts, artifacts.trajectory.start_s,
                              artifacts.trajectory.finish_s)
        live_note = _live_note(experiment, readings, forecasts, artifacts.trajectory)
    plan, power_note = _with_measured_power(plan, experiment, artifacts.summary_extra["measured_power_per_gpu_w"],
                                            artifacts.summary_extra["measured_host_power_w"])
    record = record_of(
        plan,
        artifacts.trajectory,
        experiment,
        executor="ray",
        traces_checksums=traces_checksums,
        extra={**artifacts.summary_extra, **power_note, **live_note,
               "restarts": restarts, "resumed": resume is not None, "run_store": store.name,
               "resume_checkpoint": start_from.name if start_from is not None else None,
               "skipped_checkpoints": [{"checkpoint": name, "reason": reason} for name, reason in skipped],
               "reference": spec.reference.model_dump() if spec.reference else None},
    )
    record.summary |= _measured_provisioning(plan, run_dir, record.summary)
    record.manifest["training"] = experiment.training.model_dump(mode="json")
    record.losses = losses_frame(artifacts.trajectory)
    record.timings = pd.DataFrame([vars(t) for t in artifacts.timings])
    write_run_dir(record, run_dir)
    log_run(record, experiment.tracking, mlflow_run_id)  # TensorBoard / MLflow, if [tracking] turns them on
    store.push_run()  # a run on object storage: the whole run directory goes there
    return RunResult(record.summary, run_dir, record)


def _reporting_to(live: LiveTracker | None, on_progress: Callable[[dict[str, Any]], None] | None
                  ) -> Callable[[dict[str, Any]], None] | None:
    """The progress callback: the live tracker's, then the caller's."""
    if live is None:
        return on_progress

    def report(progress: dict[str, Any]) -> None:
        live.update(progress)
        if on_progress is not None:
            on_progress(progress)

    return report


def lost_time(events: pd.DataFrame) -> list[tuple[float, float]]:
    """The stretches a live run was down (its ``lost_time`` events: from its checkpoint to the
    instant it resumed at), which a replay leaves out as the run did."""
    rows = events[events["event"] == "lost_time"]
    details = [json.loads(text) if isinstance(text, str) and text else {} for text in rows.get("details", [])]
    return [(float(d["from_s"]), float(d["to_s"])) for d in details]


def _recorded_plan(
    experiment: ExperimentConfig, spec: RunSpec, readings: list[AppliedReading],
    forecasts: list[ReceivedForecast], start_s: float, end_s: float,
) -> RunPlan:
    """A live run's plan on the readings (and forecasts) it recorded: its accounting, and its replay.
    A policy that read forecasts gets exactly those, each from the instant the run fetched it."""
    assert experiment.live is not None
    deadline_s = start_s + experiment.live.duration_s  # the live run's: a run that finished early kept it
    regions = {site: experiment.sites[site].region for site in spec.sites}
    signals = signals_from_readings(readings, max(end_s, deadline_s), regions, source=READINGS_FILE)
    read = forecasts_from_records(forecasts, regions) if getattr(spec.policy, "forecast", "none") != "none" else {}
    return plan_recorded(experiment, spec, signals, start_s, deadline_s, read)


def _live_note(
    experiment: ExperimentConfig, readings: list[AppliedReading], forecasts: list[ReceivedForecast], trajectory: Any
) -> dict[str, Any]:
    assert experiment.live is not None
    origins = pd.Series([r.origin for r in readings]).value_counts().to_dict()
    by_site: dict[str, dict[str, Any]] = {}
    for forecast in forecasts:  # which forecasts the policy read, per site
        entry = by_site.setdefault(forecast.site, {"count": 0, "sources": []})
        entry["count"] += 1
        if forecast.source not in entry["sources"]:
            entry["sources"].append(forecast.source)
    return {"live": {
        "source": experiment.live.source.kind, "start_s": trajectory.start_s, "finish_s": trajectory.finish_s,
        "readings": len(readings), "late_readings": sum(r.late for r in readings),
        "readings_by_origin": {str(k): int(v) for k, v in origins.items()}, "readings_file": READINGS_FILE,
        "forecasts_by_site": by_site, "forecasts_file": FORECASTS_FILE if forecasts else None,
    }}


def _train(
    experiment: ExperimentConfig, spec: RunSpec, store: RunStore, start_from: Path | None, *, max_restarts: int,
    on_progress: Callable[[dict[str, Any]], None] | None, progress_interval_s: float,
) -> tuple[Any, list[dict[str, Any]]]:
    """Drive the coordinator to the run's end: restart it from the newest intact checkpoint
    when it or the averager dies, stop it at a safe point on Ctrl-C. Returns its
    ``RunArtifacts`` and the restarts."""
    import ray

    from curtail.runtime.checkpoint import select_checkpoint
    from curtail.runtime.cluster import remove_stale_placement_groups
    from curtail.runtime.coordinator import Coordinator
    from curtail.runtime.placement import SitePinning, control_plane

    restarts: list[dict[str, Any]] = []
    checkpoint = start_from
    run_dir = store.local
    while True:
        coordinator = Coordinator.options(**control_plane()).remote(
            experiment.model_dump(mode="json"), spec.name, store, None if checkpoint is None else str(checkpoint)
        )
        pending = coordinator.run.remote()
        try:
            try:
                artifacts = _wait(coordinator, pending, on_progress, progress_interval_s)
            except KeyboardInterrupt:
                artifacts = _stop(coordinator, pending, store, spec, on_progress,
                                  SitePinning(experiment.training.site_pinning))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            try:
                checkpoint, skipped = select_checkpoint(run_dir)
            except CurtailError:  # none intact: restarting would drop the trained work
                checkpoint = None
            if len(restarts) >= max_restarts or checkpoint is None:
                raise error from None
            ray.kill(coordinator)
            removed = remove_stale_placement_groups(spec.sites, SitePinning(experiment.training.site_pinning))
            restarts.append({"error": str(error).splitlines()[0][:300], "checkpoint": checkpoint.name,
                             "skipped_checkpoints": [{"checkpoint": n, "reason": r} for n, r in skipped],
                             "stale_placement_groups_removed": removed})
            continue
        ray.kill(coordinator)
        if artifacts.interrupted:
            store.push_top_level()  # the journal as it ends
            raise RunInterrupted(run_dir, artifacts.checkpoint, location=store.name)
        return artifacts, restarts


def _wait(coordinator: Any, pending: Any, on_progress: Callable[[dict[str, Any]], None] | None,
          interval_s: float) -> Any:
    import ray

    while not ray.wait([pending], timeout=interval_s)[0]:
        if on_progress is not None:
            on_progress(ray.get(coordinator.progress.remote()))
    return ray.get(pending)


def _stop(coordinator: Any, pending: Any, store: RunStore, spec: RunSpec,
          on_progress: Callable[[dict[str, Any]], None] | None, pinning: Any) -> Any:
    """Ctrl-C: ask the coordinator to stop at its next safe point (it checkpoints there and
    returns interrupted artifacts). A second Ctrl-C, or a failure meanwhile, stops it at once:
    :class:`RunInterrupted` names the newest intact checkpoint."""
    import ray

    from curtail.runtime.checkpoint import journal_trained_tokens, select_checkpoint
    from curtail.runtime.cluster import remove_stale_placement_groups

    try:
        coordinator.request_stop.remote()
        if on_progress is not None:
            on_progress({"phase": "stopping at the next safe point (Ctrl-C again stops at once)"})
        while not ray.wait([pending], timeout=0.5)[0]:
            pass
        return ray.get(pending)
    except KeyboardInterrupt:
        ray.kill(coordinator)
        remove_stale_placement_groups(spec.sites, pinning)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
        pass
    try:
        newest, _ = select_checkpoint(store.local)
    except CurtailError:
        newest = None
    resumable = newest is not None or not journal_trained_tokens(store.local)
    store.push_top_level()  # the journal as it ends
    raise RunInterrupted(store.local, None if newest is None else newest.name, graceful=False,
                         resumable=resumable, location=store.name)
