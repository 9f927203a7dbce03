"""A real run's metrics while it trains: TensorBoard and MLflow, at every progress report.

:mod:`curtail.tracking` logs a run from its run directory once it is written; a 13-hour run
would show nothing until its end. With ``[tracking]`` on, :func:`curtail.api.run` also feeds
every progress report of the coordinator (every ``progress_interval_s``) to a
:class:`LiveTracker`:

- ``live/tokens``, ``live/mode`` (0 IDLE, 1 SINGLE, 2 FEDERATED), ``live/active_sites`` and
  ``live/train_loss`` (the last training loss a site reported), step = whole wall seconds since
  the run started, time = the wall clock;
- TensorBoard: event files in ``<run_dir>/tensorboard_live/`` (flushed at every report: point
  ``tensorboard --logdir RUN_DIR`` at the run to see them next to the final record);
- MLflow: the run is created when training starts (status RUNNING) and the final logging of
  :func:`curtail.tracking.log_run` completes the same MLflow run (params, the whole record,
  the summary, artifacts) and marks it FINISHED; a run that fails is marked FAILED.

A tracking backend that stops answering during a run is reported once (a warning) and not
asked again: the training never waits on it and never fails because of it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from curtail.config import TrackingConfig
from curtail.tracking import (
    MODE_CODES,
    clear_own_store,
    create_mlflow_run,
    file_store_allowed,
    mlflow_tracking_uri,
)

LIVE_TENSORBOARD_DIR = "tensorboard_live"


class LiveTracker:
    """Logs each progress report of a running real run; see the module doc."""

    def __init__(self, tracking: TrackingConfig, run_dir: Path, experiment_name: str, run_name: str) -> None:
        self.tracking = tracking
        self.started = time.monotonic()
        self.writer: Any = None
        self.client: Any = None
        self.mlflow_run_id: str | None = None
        if tracking.tensorboard:
            # TensorBoard's own writer: its flush() blocks until every event is on disk
            # (tensorboardX's returns while its thread may still hold some)
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.writer = EventFileWriter(str(Path(run_dir) / LIVE_TENSORBOARD_DIR))
        if tracking.mlflow:
            from mlflow.tracking import MlflowClient

            self.uri = mlflow_tracking_uri(tracking, run_dir)
            clear_own_store(tracking, run_dir)
            with file_store_allowed(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.mlflow_run_id = create_mlflow_run(self.client, tracking.experiment_name or experiment_name,
                                                       run_name)

    @classmethod
    def start(cls, tracking: TrackingConfig, run_dir: Path, experiment_name: str, run_name: str) -> LiveTracker | None:
        """A tracker for the enabled backends, or None when tracking is off."""
        return cls(tracking, run_dir, experiment_name, run_name) if tracking.enabled else None

    def update(self, progress: Mapping[str, Any]) -> None:
        """Log one progress report (reports before training starts carry no metrics)."""
        if progress.get("phase") != "training":
            return
        values = {
            "live/tokens": float(progress.get("tokens") or 0.0),
            "live/mode": float(MODE_CODES.get(str(progress.get("mode")), -1)),
            "live/active_sites": float(len(progress.get("active_sites") or [])),
        }
        if progress.get("loss") is not None:
            values["live/train_loss"] = float(progress["loss"])
        step, now = round(time.monotonic() - self.started), time.time()
        if self.writer is not None:
            self._guarded("TensorBoard", self._write_tensorboard, values, step, now)
        if self.client is not None:
            self._guarded("MLflow", self._write_mlflow, values, step, now)

    def close(self, failed: bool = False) -> str | None:
        """Flush and close; a failed run's MLflow run is marked FAILED. Returns the MLflow run
        id a successful run's final logging completes (None without MLflow)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if failed and self.client is not None and self.mlflow_run_id is not None:
            self._guarded("MLflow", self._terminate_failed)
        return None if failed else self.mlflow_run_id

    def _write_tensorboard(self, values: Mapping[str, float], step: int, now: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
        self.writer.add_event(Event(wall_time=now, step=step, summary=summary))
        self.writer.flush()

    def _write_mlflow(self, values: Mapping[str, float], step: int, now: float) -> None:
        from mlflow.entities import Metric

        with file_store_allowed(self.uri):
            self.client.log_batch(self.mlflow_run_id,
                                  metrics=[Metric(tag, value, round(now * 1000), step) for tag, value in values.items()])

    def _terminate_failed(self) -> None:
        with file_store_allowed(self.uri):
            self.client.set_terminated(self.mlflow_run_id, "FAILED")

    def _guarded(self, backend: str, write: Any, *args: Any) -> None:
        try:
            write(*args)
        except Exception as error:  # noqa: BLE001 (a tracking backend's trouble must never stop the training)
            warnings.warn(f"live tracking: {backend} failed ({error}); not logging to it for the rest of the run",
                          stacklevel=2)
            if backend == "TensorBoard":
                self.writer = None
            else:
                self.client = None
