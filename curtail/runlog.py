"""The run directory: one on-disk contract for simulated and real runs.

::

    RUN_DIR/
      manifest.json    resolved config, package versions, trace checksums, executor
      summary.json     the summary object (curtail.planning.summary.summarize)
      events.csv       time, t_s, site, event, details (JSON)
      intervals.csv    site, state, start, end, start_s, end_s (exact state intervals)
      modes.csv        mode, start, end, start_s, end_s (IDLE / SINGLE / FEDERATED)
      timeseries.parquet  per site at trace resolution: state, run_mode, power, energy, CI,
                       emissions, tokens, loss (Parquet: a simulated year is 300k rows)
      losses.csv       (real runs) t_s, site, tokens, loss, kind (train per site, eval of the global model)
      timings.csv      (real runs) measured wall seconds of every train / submit / load / eval command,
                       and of each worker group's start-up phases (start_ray_train, start_corpus, ...)
      emissions.csv    CodeCarbon's columns and units, a row per site (curtail.planning.codecarbon)
      model/           (real runs) the final global model and tokenizer (save_pretrained)

Both executors turn their plan and trajectory into a :class:`RunRecord` with
:func:`record_of` (sweep trials, which keep only the summary, with :func:`summary_of`).
Reports, notebooks and sweeps read only these files (:func:`read_run_dir`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from curtail.config import ExperimentConfig, SiteConfig
from curtail.planning.codecarbon import FILE as EMISSIONS_FILE
from curtail.planning.codecarbon import emissions_frame
from curtail.planning.oracle import EmissionBounds, emission_bounds
from curtail.planning.plan import RunPlan
from curtail.planning.signals import iso, iso_array
from curtail.planning.summary import summarize, timeseries
from curtail.planning.trajectory import Trajectory
from curtail.planning.windows import CurtailmentCalendar

RUN_FILES = ("manifest.json", "summary.json", "events.csv", "intervals.csv", "modes.csv", "timeseries.parquet")


@dataclass
class RunRecord:
    """Everything a run leaves behind, in memory."""

    summary: dict[str, Any]
    events: pd.DataFrame
    intervals: pd.DataFrame
    modes: pd.DataFrame
    timeseries: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    losses: pd.DataFrame | None = None
    timings: pd.DataFrame | None = None
    path: Path | None = None


def package_versions(names: tuple[str, ...] = ("curtail", "numpy", "pandas", "pydantic", "ray", "torch", "transformers")) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def summary_of(
    plan: RunPlan, trajectory: Trajectory, *, executor: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The run's ``summary.json`` object: ``trajectory`` accounted with ``plan``'s power model,
    signals and calendar, beside the emission bounds of its budget (:func:`bounds_of`);
    ``extra`` keys are added (e.g. ``simulation_s``)."""
    return summarize(
        trajectory,
        run=plan.run.name,
        policy=plan.policy.kind,
        regions=plan.regions,
        power=plan.power,
        signals=plan.signals,
        calendar=plan.calendar,
        token_budget=plan.context.token_budget,
        executor=executor,
        extra=extra,
        bounds=bounds_of(plan),
    )


def bounds_of(plan: RunPlan) -> EmissionBounds | None:
    """Both emission bounds of the run's budget, at the power its accounting uses; None where
    the plan has no signal of a site (a live plan reads the past through its calendar)."""
    if not isinstance(plan.calendar, CurtailmentCalendar) or set(plan.signals) != set(plan.context.sites):
        return None
    return emission_bounds(plan.context, training_power_w={site: p.training_w for site, p in plan.power.items()})


def record_of(
    plan: RunPlan,
    trajectory: Trajectory,
    config: ExperimentConfig,
    *,
    executor: str,
    traces_checksums: Mapping[str, str],
    extra: Mapping[str, Any] | None = None,
) -> RunRecord:
    """A run (simulated, ``executor="simulator"``, or real, ``"ray"``) as a :class:`RunRecord`:
    :func:`summary_of`, the event, interval and mode frames, the per-site timeseries and the
    manifest (``config``, package versions, trace checksums). Nothing is written."""
    manifest = {
        "executor": executor,
        "experiment": config.name,
        "run": plan.run.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "trace_checksums_sha256": dict(traces_checksums),
    }
    return RunRecord(
        summary=summary_of(plan, trajectory, executor=executor, extra=extra),
        events=events_frame(trajectory),
        intervals=intervals_frame(trajectory),
        modes=modes_frame(trajectory),
        timeseries=timeseries(trajectory, plan.power, plan.signals),
        manifest=manifest,
    )


def events_frame(trajectory: Trajectory) -> pd.DataFrame:
    t_s = np.array([e.t_s for e in trajectory.events], dtype=float)
    return pd.DataFrame(
        {
            "time": iso_array(t_s),
            "t_s": t_s,
            "site": [e.site for e in trajectory.events],
            "event": [e.event for e in trajectory.events],
            "details": [json.dumps(e.details, sort_keys=True, default=str) for e in trajectory.events],
        }
    )


def _spans_frame(label: str, labels: list[str], start_s: list[float], end_s: list[float]) -> pd.DataFrame:
    starts, ends = np.array(start_s, dtype=float), np.array(end_s, dtype=float)
    return pd.DataFrame(
        {label: labels, "start": iso_array(starts), "end": iso_array(ends), "start_s": starts, "end_s": ends}
    )


def intervals_frame(trajectory: Trajectory) -> pd.DataFrame:
    intervals = trajectory.intervals
    frame = _spans_frame(
        "state", [i.state.value for i in intervals], [i.start_s for i in intervals], [i.end_s for i in intervals]
    )
    frame.insert(0, "site", [i.site for i in intervals])
    return frame


def modes_frame(trajectory: Trajectory) -> pd.DataFrame:
    modes = trajectory.modes
    return _spans_frame("mode", [m.mode.value for m in modes], [m.start_s for m in modes], [m.end_s for m in modes])


def losses_frame(trajectory: Trajectory) -> pd.DataFrame | None:
    if not trajectory.losses:
        return None
    return pd.DataFrame(
        [{"t_s": p.t_s, "time": iso(p.t_s), "site": p.site, "tokens": p.tokens, "loss": p.loss, "kind": p.kind} for p in trajectory.losses]
    )


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temp, path)


def write_run_dir(record: RunRecord, path: Path, *, replace_simulated: bool = True) -> Path:
    """Write the run directory. An existing *simulated* run of the same path is replaced;
    anything else there is an error (a real run's outputs are never overwritten)."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        executor = json.loads(manifest.read_text()).get("executor")
        if not (replace_simulated and executor == "simulator" and record.manifest.get("executor") == "simulator"):
            raise FileExistsError(
                f"{path} already holds a run (executor={executor!r}); choose another output_dir or run name"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path / "manifest.json", json.dumps(record.manifest, indent=2, default=str))
    record.events.to_csv(path / "events.csv", index=False)
    record.intervals.to_csv(path / "intervals.csv", index=False)
    record.modes.to_csv(path / "modes.csv", index=False)
    record.timeseries.to_parquet(path / "timeseries.parquet", index=False)
    if record.losses is not None:
        record.losses.to_csv(path / "losses.csv", index=False)
    if record.timings is not None:
        record.timings.to_csv(path / "timings.csv", index=False)
    sites = {name: SiteConfig.model_validate(site) for name, site in record.manifest["config"]["sites"].items()}
    emissions_frame(record.summary, sites, record.manifest["experiment"]).to_csv(path / EMISSIONS_FILE, index=False)
    # summary last: its presence marks a complete run directory
    _atomic_write_text(path / "summary.json", json.dumps(record.summary, indent=2, default=str))
    record.path = path
    return path


def read_run_dir(path: str | Path) -> RunRecord:
    """Load a run directory written by :func:`write_run_dir` (simulated or real)."""
    path = Path(path)
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete run directory: missing {missing}")
    timeseries = pd.read_parquet(path / "timeseries.parquet")
    losses = pd.read_csv(path / "losses.csv") if (path / "losses.csv").is_file() else None
    timings = pd.read_csv(path / "timings.csv") if (path / "timings.csv").is_file() else None
    return RunRecord(
        summary=json.loads((path / "summary.json").read_text()),
        events=pd.read_csv(path / "events.csv", keep_default_na=False),
        intervals=pd.read_csv(path / "intervals.csv"),
        modes=pd.read_csv(path / "modes.csv"),
        timeseries=timeseries,
        manifest=json.loads((path / "manifest.json").read_text()),
        losses=losses,
        timings=timings,
        path=path,
    )
