"""Experiment tracking: run directories and Tune sweeps logged to TensorBoard and/or MLflow.

Off by default; ``[tracking]`` in the experiment TOML turns it on (:class:`TrackingConfig`).
A single run, simulated or on Ray, is logged from its run record once the run directory is
written, so tracking never slows the training path and both executors log the same things:

- params: the experiment config flattened with dots (``rules.threshold_g_per_kwh``,
  ``sites.caiso_north.num_gpus``, ``training.outer_lr``) and this run's spec (``run.policy.kind``,
  ``run.sites``), without the other runs and the sweep;
- over the run's clock: ``run/tokens``, ``run/energy_kwh``, ``run/emissions_kg`` (so far, all
  sites), ``run/power_w``, ``run/mode`` (0 IDLE, 1 SINGLE, 2 FEDERATED) and per site
  ``site/<name>/tokens``, ``/power_w``, ``/ci_g_per_kwh``, ``/emissions_kg``: step = whole seconds
  since the run's start, time = the instant on the run's clock (trace time, not wall time);
- losses (real runs): ``loss/train/<site>`` and ``loss/eval`` (held-out loss of the global model
  after every sync): step = tokens trained across sites, time = the instant on the run's clock;
- ``summary/<key>``: every number in summary.json (nested keys joined with ``/``, booleans as
  0/1) at the final step;
- MLflow artifacts: summary.json, manifest.json, emissions.csv and report figures found in the run directory.

While a real run trains, :mod:`curtail.live_tracking` logs its progress reports too (``live/...``)
into the MLflow run this logging then completes.

TensorBoard event files go to ``<run_dir>/tensorboard/``; MLflow to ``mlflow_tracking_uri``,
by default a file store in the run directory (``<run_dir>/mlruns``), one MLflow run per run.
Logging a run directory again replaces those two run-directory outputs.

Sweeps use Ray's integrations: :func:`tune_callbacks` gives Tune's ``TBXLoggerCallback`` (event
files in each trial's folder) and ``MLflowLoggerCallback`` (one MLflow run per trial, store by
default ``<sweep dir>/mlruns``) for the sweep's ``RunConfig``.

    from curtail.tracking import log_run_dir
    log_run_dir("runs/paper/threshold", TrackingConfig(tensorboard=True, mlflow=True))
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from curtail.config import TrackingConfig
from curtail.runlog import RunRecord, read_run_dir

INSTALL_HINT = "pip install 'curtail[tracking]'  (from a checkout: pip install -e '.[tracking]')"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MODE_CODES = {"IDLE": 0, "SINGLE": 1, "FEDERATED": 2}
MAX_POINTS_PER_SERIES = 2000
"""Longer series (a simulated year at 5-minute resolution) are thinned evenly, last point kept."""
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
_MLFLOW_PARAM_VALUE_MAX = 6000


class TrackingError(RuntimeError):
    """Tracking is on but cannot work (a package is missing); the message says what to install."""


@dataclass(frozen=True)
class Scalar:
    """One logged value: ``tag`` at integer ``step``, at ``t_s`` (Unix seconds, the run's clock)."""

    tag: str
    value: float
    step: int
    t_s: float


@dataclass(frozen=True)
class Tracked:
    """Where a run was logged."""

    tensorboard_dir: Path | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_id: str | None = None
    mlflow_run_id: str | None = None


# ----------------------------------------------------------------------------- availability


def check_available(tracking: TrackingConfig) -> None:
    """Raise :class:`TrackingError` naming the pip command if an enabled backend is missing.

    Called before a run starts, so a missing package never costs a finished training run.
    """
    missing = []
    if tracking.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        missing.append(("tracking.tensorboard", "tensorboardX"))
    if tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        missing.append(("tracking.mlflow", "mlflow-skinny"))
    if missing:
        keys = " and ".join(key for key, _ in missing)
        packages = ", ".join(package for _, package in missing)
        raise TrackingError(
            f"{keys} = true needs {packages}, which is not installed: run {INSTALL_HINT}, "
            "or set it to false in [tracking]"
        )


# ----------------------------------------------------------------------------- what is logged


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}.{index}", out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value, default=str)
    else:
        out[prefix] = value


def run_params(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The experiment config and this run's spec, flattened to ``dotted.key -> str``."""
    config = {k: v for k, v in (manifest.get("config") or {}).items() if k not in ("runs", "sweep")}
    flat: dict[str, Any] = {}
    _flatten(config, "", flat)
    _flatten(manifest.get("run") or {}, "run", flat)
    flat["executor"] = manifest.get("executor")
    return {_clean_key(k): str(v)[:_MLFLOW_PARAM_VALUE_MAX] for k, v in flat.items()}


def summary_metrics(summary: Mapping[str, Any], prefix: str = "summary") -> dict[str, float]:
    """Every finite number in a summary (nested dicts joined with ``/``; booleans as 0/1)."""
    metrics: dict[str, float] = {}
    for key, value in summary.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            metrics.update(summary_metrics(value, tag))
        elif isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
            metrics[_clean_key(tag)] = float(value)
    return metrics


def _clean_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / :`` and spaces in names."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def _thin(count: int) -> np.ndarray:
    if count <= MAX_POINTS_PER_SERIES:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, MAX_POINTS_PER_SERIES).round().astype(int))


def _series(tag: str, values: np.ndarray, steps: np.ndarray, t_s: np.ndarray) -> list[Scalar]:
    keep = _thin(len(values))
    return [
        Scalar(_clean_key(tag), float(values[i]), int(steps[i]), float(t_s[i]))
        for i in keep
        if math.isfinite(values[i])
    ]


def _unix_s(times: pd.Series) -> np.ndarray:
    return pd.to_datetime(times, utc=True).astype("datetime64[ns, UTC]").astype("int64").to_numpy() / 1e9


def run_scalars(record: RunRecord) -> list[Scalar]:
    """The run over its clock (timeseries, modes), its losses, and its summary numbers."""
    summary = record.summary
    start_s = pd.Timestamp(summary["start"]).timestamp()
    finish_s = pd.Timestamp(summary["finish"]).timestamp()

    def clock_step(t_s: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(t_s, dtype=float) - start_s).astype(np.int64)

    scalars: list[Scalar] = []
    frame = record.timeseries
    if frame is not None and len(frame):
        frame = frame.assign(start_s=_unix_s(frame["time"])).sort_values(["site", "start_s"], kind="stable")
        totals = []
        for site, rows in frame.groupby("site", sort=True):
            begin = rows["start_s"].to_numpy()
            end = np.append(begin[1:], finish_s)  # a row's energy and tokens are over [begin, end)
            cumulative = pd.DataFrame(
                {
                    "t_s": end,
                    "tokens": rows["tokens"].to_numpy(),
                    "energy_kwh": np.cumsum(rows["energy_kwh"].to_numpy()),
                    "emissions_kg": np.cumsum(rows["emissions_kg"].to_numpy()),
                    "site": site,
                }
            )
            totals.append(cumulative)
            scalars += _series(f"site/{site}/tokens", cumulative["tokens"].to_numpy(), clock_step(end), end)
            scalars += _series(
                f"site/{site}/emissions_kg", cumulative["emissions_kg"].to_numpy(), clock_step(end), end
            )
            for column in ("power_w", "ci_g_per_kwh"):
                scalars += _series(f"site/{site}/{column}", rows[column].to_numpy(), clock_step(begin), begin)
        # all sites: each site's running totals carried forward to every instant any site reports
        wide = pd.concat(totals).pivot_table(index="t_s", columns="site", values=["tokens", "energy_kwh", "emissions_kg"])
        wide = wide.sort_index().ffill().fillna(0.0)
        t_s = np.concatenate(([start_s], wide.index.to_numpy()))
        for column in ("tokens", "energy_kwh", "emissions_kg"):
            values = np.concatenate(([0.0], wide[column].sum(axis=1).to_numpy()))
            scalars += _series(f"run/{column}", values, clock_step(t_s), t_s)
        power = frame.pivot_table(index="start_s", columns="site", values="power_w").sort_index().ffill().fillna(0.0)
        scalars += _series("run/power_w", power.sum(axis=1).to_numpy(), clock_step(power.index.to_numpy()), power.index.to_numpy())
    modes = record.modes
    if modes is not None and len(modes):
        t_s = np.append(modes["start_s"].to_numpy(dtype=float), modes["end_s"].to_numpy(dtype=float)[-1])
        codes = [MODE_CODES.get(mode, -1) for mode in modes["mode"]]
        values = np.array(codes + codes[-1:], dtype=float)
        scalars += _series("run/mode", values, clock_step(t_s), t_s)
    losses = record.losses
    if losses is not None and len(losses):
        for (kind, site), rows in losses.groupby(["kind", losses["site"].fillna("")], sort=True):
            tag = "loss/eval" if kind == "eval" else f"loss/{kind}/{site}" if site else f"loss/{kind}"
            rows = rows.sort_values("t_s", kind="stable")
            scalars += _series(
                tag, rows["loss"].to_numpy(dtype=float), rows["tokens"].to_numpy(dtype=float).round(), rows["t_s"].to_numpy(dtype=float)
            )
    final_step = round(finish_s - start_s)
    scalars += [Scalar(tag, value, final_step, finish_s) for tag, value in summary_metrics(summary).items()]
    return scalars


def _artifacts(run_dir: Path) -> list[Path]:
    files = [run_dir / name for name in ("summary.json", "manifest.json", "emissions.csv") if (run_dir / name).is_file()]
    for folder in (run_dir, run_dir / "report", run_dir / "reports"):
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FIGURE_SUFFIXES)
    return files


# ----------------------------------------------------------------------------- backends


def mlflow_tracking_uri(tracking: TrackingConfig, default_dir: Path) -> str:
    """The configured store, paths made absolute ``file:`` URIs; default ``file:<default_dir>/mlruns``."""
    uri = tracking.mlflow_tracking_uri
    if uri is None:
        return (Path(default_dir).resolve() / MLFLOW_DIR).as_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(uri[len("file:") :].removeprefix("//")).resolve().as_uri()
    if len(parsed.scheme) <= 1:  # a plain path (a one-letter scheme is a Windows drive)
        return Path(uri).resolve().as_uri()
    return uri


@contextmanager
def file_store_allowed(uri: str | None) -> Iterator[None]:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a local file
    store inside the run directory is what curtail wants (no database, no server), so allow it
    for the duration of the logging (an explicit setting in the environment wins)."""
    if uri is None or not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def _write_tensorboard(directory: Path, scalars: list[Scalar], params: Mapping[str, str]) -> Path:
    from tensorboardX import SummaryWriter

    if directory.exists():
        shutil.rmtree(directory)
    writer = SummaryWriter(logdir=str(directory), flush_secs=3600)
    try:
        table = "\n".join(["| param | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in sorted(params.items()))])
        writer.add_text("params", table, global_step=0)
        for scalar in scalars:
            writer.add_scalar(scalar.tag, scalar.value, global_step=scalar.step, walltime=scalar.t_s)
    finally:
        writer.close()
    return directory


def _write_mlflow(
    uri: str,
    experiment_name: str,
    run_name: str,
    scalars: list[Scalar],
    params: Mapping[str, str],
    tags: Mapping[str, str],
    artifacts: list[Path],
    run_id: str | None = None,
) -> tuple[str, str]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    with file_store_allowed(uri):
        root = Path(urlparse(uri).path)
        if uri.startswith("file:") and not root.is_dir():
            # MLflow caches one store per URI for the process, and a cached store does not lay
            # out its folder again after a rewrite of the run directory removed it: a new one does
            from mlflow.store.tracking.file_store import FileStore

            FileStore(root.as_uri())
        client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            run_id = create_mlflow_run(client, experiment_name, run_name)
        experiment_id = client.get_run(run_id).info.experiment_id
        try:
            client.log_batch(
                run_id,
                metrics=[Metric(s.tag, s.value, round(s.t_s * 1000), s.step) for s in scalars],
                params=[Param(key, value) for key, value in params.items()],
                tags=[RunTag(key, value) for key, value in tags.items()],
            )
            for path in artifacts:
                client.log_artifact(run_id, str(path))
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    return experiment_id, run_id


def create_mlflow_run(client: Any, experiment_name: str, run_name: str) -> str:
    """A new run (status RUNNING) in the MLflow experiment ``experiment_name``, created if
    needed; its id."""
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(experiment_name)
    return client.create_run(experiment_id, run_name=run_name).info.run_id


def clear_own_store(tracking: TrackingConfig, run_dir: Path) -> None:
    """Remove the run directory's own MLflow store (the default, ``RUN_DIR/mlruns``): it holds
    this run only, so logging the run anew starts from an empty one. A configured store is kept."""
    if tracking.mlflow_tracking_uri is None and (Path(run_dir) / MLFLOW_DIR).exists():
        shutil.rmtree(Path(run_dir) / MLFLOW_DIR)


def log_run(record: RunRecord, tracking: TrackingConfig, mlflow_run_id: str | None = None) -> Tracked:
    """Log a written run (``record.path`` set) to the enabled backends; see the module doc.
    ``mlflow_run_id``: the MLflow run a :class:`~curtail.live_tracking.LiveTracker` opened for
    it, completed here instead of a new one."""
    if not tracking.enabled:
        return Tracked()
    if record.path is None:
        raise ValueError("tracking logs written runs: write the run directory first (record.path is None)")
    check_available(tracking)
    run_dir = Path(record.path)
    params = run_params(record.manifest)
    scalars = run_scalars(record)
    tensorboard_dir = None
    if tracking.tensorboard:
        tensorboard_dir = _write_tensorboard(run_dir / TENSORBOARD_DIR, scalars, params)
    uri = experiment_id = run_id = None
    if tracking.mlflow:
        uri = mlflow_tracking_uri(tracking, run_dir)
        if mlflow_run_id is None:
            clear_own_store(tracking, run_dir)
        summary = record.summary
        experiment = tracking.experiment_name or record.manifest.get("experiment") or "curtail"
        tags = {
            "curtail.run": str(summary.get("run")),
            "curtail.policy": str(summary.get("policy")),
            "curtail.executor": str(summary.get("executor")),
            "curtail.sites": "+".join(summary.get("sites") or []),
            "curtail.run_dir": str(run_dir.resolve()),
        }
        experiment_id, run_id = _write_mlflow(
            uri, experiment, str(summary.get("run")), scalars, params, tags, _artifacts(run_dir), mlflow_run_id
        )
    return Tracked(tensorboard_dir, uri, experiment_id, run_id)


def log_run_dir(run_dir: str | Path, tracking: TrackingConfig) -> Tracked:
    """Log an existing run directory (simulated or real) to the enabled backends."""
    return log_run(read_run_dir(run_dir), tracking)


# ----------------------------------------------------------------------------- Tune sweeps


@contextmanager
def tune_callbacks(tracking: TrackingConfig, sweep_dir: Path, experiment_name: str) -> Iterator[list[Any]]:
    """Ray's logger callbacks for a sweep's ``RunConfig(callbacks=...)``; keep ``Tuner.fit()``
    inside the ``with`` block (MLflow's file store is allowed for its duration).

    ``TBXLoggerCallback`` writes each trial's reported metrics to event files in the trial's
    folder (``tensorboard --logdir <sweep dir>/tune``); ``MLflowLoggerCallback`` logs each trial
    as an MLflow run (its sampled config as params, its metrics) in ``experiment_name``.
    """
    if not tracking.enabled:
        yield []
        return
    check_available(tracking)
    callbacks: list[Any] = []
    uri = None
    if tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if tracking.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = mlflow_tracking_uri(tracking, sweep_dir)
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=uri,
                experiment_name=tracking.experiment_name or experiment_name,
                tags={"curtail.sweep_dir": str(Path(sweep_dir).resolve())},
            )
        )
    with file_store_allowed(uri):
        yield callbacks
