"""A tiny two-site real run on a scripted trace, shared by the runtime and fault tests.

The trace makes a run go through every mode: site a alone (SINGLE), b joins (hand-off, then
FEDERATED rounds), a leaves mid-round, b alone, nobody (IDLE), then a rejoins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEP_TOKENS = 2 * 64  # tiny preset: batch 2 × seq 64
STEP_S = 120.0  # virtual seconds per step at each site
LIVE_READS = pytest.StashKey[list]()
"""What conftest.py's tracked run read back from its own MLflow store and TensorBoard files while it trained."""


def read_live_tracking(runs: Path) -> dict:
    """The live metrics of the one tracked run under ``runs``, read from outside the run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from curtail.tracking import file_store_allowed

    (store,) = runs.glob("*/*/mlruns")
    with file_store_allowed(store.as_uri()):
        client = MlflowClient(tracking_uri=store.as_uri())
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        tokens = [m.value for m in client.get_metric_history(run.info.run_id, "live/tokens")]
    accumulator = EventAccumulator(str(store.parent / "tensorboard_live"))
    accumulator.Reload()
    return {"run_id": run.info.run_id, "status": run.info.status, "live_tokens": tokens,
            "tensorboard_tags": set(accumulator.Tags()["scalars"])}


def trace_csv(path: Path) -> Path:
    times = pd.date_range("2026-01-11 00:00", periods=48, freq="5min", tz="UTC")  # 4 hours
    minutes = np.arange(48) * 5
    site_a = np.where(((minutes >= 5) & (minutes < 120)) | ((minutes >= 200) & (minutes < 235)), 20.0, 400.0)
    site_b = np.where((minutes >= 40) & (minutes < 180), 30.0, 450.0)
    frame = pd.DataFrame({"time": times.strftime("%Y-%m-%dT%H:%M:%S+00:00"), "A": site_a, "B": site_b})
    frame.to_csv(path, index=False)
    return path


def tiny_experiment(tmp: Path) -> dict:
    corpus = tmp / "corpus.txt"
    corpus.write_text((ROOT / "data/text/tinyshakespeare.txt").read_text()[:120_000])
    site = {"training_power_w": 1000, "idle_power_w": 200, "tokens_per_s": STEP_TOKENS / STEP_S}
    return {
        "name": "runtime-test",
        "seed": 7,
        "token_budget": 10_000_000,  # more than fits: the trace end stops the run
        "traces": [{"path": str(trace_csv(tmp / "trace.csv"))}],
        "rules": {"threshold_g_per_kwh": 100, "hysteresis_s": 600, "provisioning_s": 240},
        "execution": {"round_s": 600, "sync_s": 5, "group_start_s": 30, "join": "immediate"},
        "training": {
            "preset": "tiny", "corpus": [str(corpus)], "vocab_size": 512, "batch_size": 2,
            "eval_batches": 2, "eval_batch_size": 2, "cpus_per_worker": 0.5,
            "cache_dir": str(tmp / "cache"), "command_timeout_s": 300,
            "micro_batch_size": 1, "power": "measured",  # no NVML here: falls back to the model
            # the outer step with state (momentum in checkpoints and resumes); averaging's actor: test_averager.py
            "outer_optimizer": "nesterov",
        },
        "sites": {"a": {"region": "A", **site}, "b": {"region": "B", **site}},
        "runs": [{"name": "two-sites", "policy": {"kind": "threshold"}, "sites": ["a", "b"]}],
    }
