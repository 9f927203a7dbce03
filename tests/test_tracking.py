"""Tracking: a simulated run, a real Ray run and a Tune sweep logged to MLflow (local file store)
and TensorBoard, read back with MLflow's client and TensorBoard's event reader and compared with
the run directory's own numbers."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from planning_fixtures import PAPER_TOML, REPO

import curtail
from curtail.config import ConfigError, TrackingConfig, parse_experiment
from curtail.runlog import read_run_dir
from curtail.tracking import MODE_CODES, TrackingError, check_available, log_run_dir

pytest.importorskip("mlflow", reason="pip install -e '.[tracking]'")
pytest.importorskip("tensorboard", reason="pip install -e '.[tracking]'")

ON = {"tensorboard": True, "mlflow": True}


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch):
    """Reading a file store back needs the same opt-in MLflow 3 asks of every file-store user."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def paper(tracking: dict | None = None) -> dict:
    data = tomllib.loads(PAPER_TOML.read_text())
    data["traces"][0]["path"] = str(REPO / "data/traces/watttime_moer_2026-01-11_4regions.csv")
    if tracking is not None:
        data["tracking"] = tracking
    return data


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client, client.search_runs([found.experiment_id])


def scalars(tensorboard_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(tensorboard_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def unix_s(iso: str) -> float:
    return pd.Timestamp(iso).timestamp()


# ----------------------------------------------------------------------------- config


def test_tracking_is_off_by_default_and_typed():
    config = parse_experiment(paper())
    assert config.tracking == TrackingConfig() and not config.tracking.enabled
    on = parse_experiment(paper({"mlflow": True, "experiment_name": "x"}))
    assert on.tracking.mlflow and not on.tracking.tensorboard and on.tracking.enabled


@pytest.mark.parametrize("key", ["tensorbord", "mlflow_uri"])
def test_unknown_tracking_keys_are_refused_by_name(key):
    with pytest.raises(ConfigError, match=rf"tracking\.{key}: unknown key"):
        parse_experiment(paper({key: True}))


@pytest.mark.parametrize("uri", ["https://alice:s3cr3t-t0ken@mlflow.example.org", "http://s3cr3t-t0ken@host:5000/x"])
def test_credentials_in_the_tracking_uri_are_refused_without_echo(uri):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME") as error:
        parse_experiment(paper({"mlflow": True, "mlflow_tracking_uri": uri}))
    assert "s3cr3t" not in str(error.value)
    assert parse_experiment(paper({"mlflow": True, "mlflow_tracking_uri": "https://mlflow.example.org/a@b"}))


def test_a_missing_package_names_the_pip_command_before_anything_runs(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    check_available(TrackingConfig(tensorboard=True))  # tensorboardX is there
    with pytest.raises(TrackingError, match=r"tracking\.mlflow = true needs mlflow-skinny.*pip install 'curtail\[tracking\]'"):
        curtail.simulate(paper(ON), runs=["threshold"], output_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any run directory was written


# ----------------------------------------------------------------------------- a simulated run


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    result = curtail.simulate(paper(ON), runs=["threshold", "centralized-caiso_north"], output_dir=root)
    return {r.summary["run"]: r for r in result.records}


def test_simulated_run_in_mlflow_matches_summary_json(tracked):
    record = tracked["threshold"]
    summary = json.loads((record.path / "summary.json").read_text())
    client, runs = mlflow_runs((record.path / "mlruns").as_uri(), "paper")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "threshold" and run.info.status == "FINISHED"
    assert run.data.tags["curtail.executor"] == "simulator"
    params = run.data.params
    assert params["run.policy.kind"] == "threshold"
    assert params["run.sites"] == json.dumps(["caiso_north", "spp_tx", "nem_sa"])
    assert params["rules.threshold_g_per_kwh"] == "100.0"
    assert params["execution.round_s"] == "600.0"
    assert params["sites.nem_sa.tokens_per_s"] == "191454.0"
    assert float(params["token_budget"]) == summary["token_budget"] == 12_268_339_200
    assert params["executor"] == "simulator" and params["tracking.mlflow"] == "True"
    assert not any(key.startswith(("runs.", "sweep.")) for key in params)

    metrics = run.data.metrics  # the latest value of each
    assert metrics["summary/emissions_kg"] == summary["emissions_kg"]
    assert metrics["summary/hours"] == summary["hours"]
    assert metrics["summary/share_energy_in_windows"] == summary["share_energy_in_windows"]
    assert metrics["summary/num_syncs"] == summary["num_syncs"] == 31
    assert metrics["summary/completed"] == 1.0
    for mode, hours in summary["mode_hours"].items():
        assert metrics[f"summary/mode_hours/{mode}"] == hours
    for site, kg in summary["emissions_kg_by_site"].items():
        assert metrics[f"summary/emissions_kg_by_site/{site}"] == kg

    # over the run's clock: step = seconds since the start, timestamp = the instant (trace time)
    start_ms, finish_ms = 1000 * unix_s(summary["start"]), 1000 * unix_s(summary["finish"])
    final_step = round(summary["hours"] * 3600)
    for tag, total in (("run/tokens", summary["tokens"]), ("run/emissions_kg", summary["emissions_kg"]),
                       ("run/energy_kwh", summary["energy_kwh"])):
        history = sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)
        values = np.array([m.value for m in history])
        assert history[0].step == 0 and history[0].value == 0.0 and history[0].timestamp == start_ms
        assert history[-1].step == final_step and history[-1].timestamp == finish_ms
        assert values[-1] == pytest.approx(total, rel=1e-9), tag
        assert (np.diff(values) >= -1e-9).all(), f"{tag} so far never decreases"
        assert len(history) > 100
    modes = pd.read_csv(record.path / "modes.csv")
    mode_history = sorted(client.get_metric_history(run.info.run_id, "run/mode"), key=lambda m: m.step)
    assert [m.value for m in mode_history][:-1] == [MODE_CODES[m] for m in modes["mode"]]
    assert [m.timestamp for m in mode_history][:-1] == [round(1000 * s) for s in modes["start_s"]]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "manifest.json", "emissions.csv"} <= artifacts
    saved = Path(client.download_artifacts(run.info.run_id, "summary.json", str(record.path.parent / "dl")))
    assert json.loads(saved.read_text()) == summary


def test_simulated_run_in_tensorboard_matches_the_run_directory(tracked):
    record = tracked["threshold"]
    run = read_run_dir(record.path)
    summary = run.summary
    found = scalars(record.path / "tensorboard")
    sites = summary["sites"]
    expected = {"run/tokens", "run/emissions_kg", "run/energy_kwh", "run/power_w", "run/mode",
                "summary/emissions_kg", "summary/mode_hours/FEDERATED"}
    expected |= {f"site/{s}/{m}" for s in sites for m in ("tokens", "emissions_kg", "power_w", "ci_g_per_kwh")}
    assert expected <= set(found)
    # float32 in event files
    assert found["summary/emissions_kg"][-1].value == pytest.approx(summary["emissions_kg"], rel=1e-6)
    last = found["run/emissions_kg"][-1]
    assert last.value == pytest.approx(summary["emissions_kg"], rel=1e-6)
    assert last.step == round(summary["hours"] * 3600) and last.wall_time == unix_s(summary["finish"])
    for site in sites:
        tokens = found[f"site/{site}/tokens"][-1].value
        assert tokens == pytest.approx(summary["tokens_by_site"][site], rel=1e-6)
        kg = found[f"site/{site}/emissions_kg"][-1].value
        assert kg == pytest.approx(summary["emissions_kg_by_site"][site], rel=1e-6, abs=1e-9)
        rows = run.timeseries[run.timeseries["site"] == site]
        ci = [e.value for e in found[f"site/{site}/ci_g_per_kwh"]]
        assert ci == pytest.approx(rows["ci_g_per_kwh"].to_list(), rel=1e-6)
        assert found[f"site/{site}/ci_g_per_kwh"][0].wall_time == unix_s(summary["start"])


def test_each_run_directory_has_its_own_store(tracked):
    """The centralized baseline only ever trains at one site: its own numbers, its own store."""
    record = tracked["centralized-caiso_north"]
    _, runs = mlflow_runs((record.path / "mlruns").as_uri(), "paper")
    assert [r.info.run_name for r in runs] == ["centralized-caiso_north"]
    assert runs[0].data.metrics["summary/emissions_kg"] == record.summary["emissions_kg"]
    assert runs[0].data.metrics["summary/mode_hours/FEDERATED"] == 0.0
    assert set(runs[0].data.metrics) >= {"site/caiso_north/tokens"}
    assert not any(key.startswith("site/spp_tx") for key in runs[0].data.metrics)


def test_logging_a_run_directory_again_replaces_its_tracking_files(tracked, tmp_path):
    run_dir = tracked["threshold"].path
    before = scalars(run_dir / "tensorboard")
    logged = log_run_dir(run_dir, TrackingConfig(tensorboard=True, mlflow=True))
    assert logged.tensorboard_dir == run_dir / "tensorboard"
    _, runs = mlflow_runs(logged.mlflow_tracking_uri, "paper")
    assert [r.info.run_id for r in runs] == [logged.mlflow_run_id]  # one run, not two
    after = scalars(run_dir / "tensorboard")  # one event file, same values
    assert {tag: [e.value for e in v] for tag, v in after.items() if not tag.endswith("simulation_s")} == {
        tag: [e.value for e in v] for tag, v in before.items() if not tag.endswith("simulation_s")
    }
    # a shared store elsewhere, under another experiment name, keeps every logging
    shared = tmp_path / "shared-store"
    config = TrackingConfig(mlflow=True, mlflow_tracking_uri=str(shared), experiment_name="compare")
    for _ in range(2):
        log_run_dir(run_dir, config)
    _, runs = mlflow_runs(shared.resolve().as_uri(), "compare")
    assert len(runs) == 2
    assert {r.data.metrics["summary/emissions_kg"] for r in runs} == {tracked["threshold"].summary["emissions_kg"]}


# ----------------------------------------------------------------------------- real run and sweep


def test_live_metrics_are_readable_while_the_run_goes_on_and_the_final_logging_completes_that_run(tmp_path):
    from curtail.config import TrackingConfig
    from curtail.live_tracking import LIVE_TENSORBOARD_DIR, LiveTracker
    from curtail.tracking import log_run

    record = curtail.simulate(paper(), runs=["threshold"], output_dir=tmp_path).records[0]
    tracking = TrackingConfig(**ON)
    live = LiveTracker.start(tracking, record.path, "paper", "threshold")
    live.update({"phase": "preparing data"})  # no metrics before training starts
    reports = [{"phase": "training", "tokens": 256.0 * i, "mode": mode, "active_sites": sites, "loss": loss}
               for i, (mode, sites, loss) in enumerate([("SINGLE", ["a"], None), ("FEDERATED", ["a", "b"], 6.1),
                                                         ("FEDERATED", ["a", "b"], 5.9)], start=1)]
    for report in reports:
        live.update(report)
    # read back mid-run: the MLflow run is RUNNING with every report, TensorBoard's file is flushed
    client, runs = mlflow_runs((record.path / "mlruns").as_uri(), "paper")
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    tokens = client.get_metric_history(runs[0].info.run_id, "live/tokens")
    assert sorted(m.value for m in tokens) == [256.0, 512.0, 768.0]
    assert {m.value for m in client.get_metric_history(runs[0].info.run_id, "live/mode")} == {1.0, 2.0}
    assert sorted(m.value for m in client.get_metric_history(runs[0].info.run_id, "live/train_loss")) == [5.9, 6.1]
    found = scalars(record.path / LIVE_TENSORBOARD_DIR)
    assert {e.value for e in found["live/active_sites"]} == {1.0, 2.0}
    # the end of the run: the same MLflow run gets the whole record and is FINISHED
    tracked = log_run(record, tracking, live.close())
    _, runs = mlflow_runs((record.path / "mlruns").as_uri(), "paper")
    assert len(runs) == 1 and runs[0].info.run_id == tracked.mlflow_run_id and runs[0].info.status == "FINISHED"
    assert {"live/tokens", "run/tokens", "summary/emissions_kg"} <= set(runs[0].data.metrics)


def test_a_failed_run_is_marked_failed_and_a_dead_backend_never_stops_the_training(tmp_path):
    from curtail.config import TrackingConfig
    from curtail.live_tracking import LiveTracker

    live = LiveTracker.start(TrackingConfig(mlflow=True), tmp_path, "paper", "threshold")
    live.update({"phase": "training", "tokens": 1.0, "mode": "SINGLE", "active_sites": ["a"], "loss": 7.0})
    assert live.close(failed=True) is None
    _, runs = mlflow_runs((tmp_path / "mlruns").as_uri(), "paper")
    assert runs[0].info.status == "FAILED"
    broken = LiveTracker.start(TrackingConfig(mlflow=True), tmp_path / "other", "paper", "threshold")
    broken.mlflow_run_id = "no-such-run"
    with pytest.warns(UserWarning, match="live tracking: MLflow failed"):
        broken.update({"phase": "training", "tokens": 1.0, "mode": "SINGLE", "active_sites": ["a"], "loss": None})
    broken.update({"phase": "training", "tokens": 2.0, "mode": "SINGLE", "active_sites": ["a"], "loss": None})  # not asked again
    assert LiveTracker.start(TrackingConfig(), tmp_path, "paper", "threshold") is None  # tracking off


@pytest.mark.slow
def test_a_real_run_is_visible_in_mlflow_and_tensorboard_while_it_trains(two_runs, request):
    """Read back from inside the tracked run of conftest.py, while it trained (``live_reads``)."""
    from runtime_fixtures import LIVE_READS

    reads = request.config.stash[LIVE_READS]
    assert reads, "the run was never read back while it trained"
    first = reads[0]
    assert "error" not in first, first
    assert first["status"] == "RUNNING" and first["live_tokens"] and first["tensorboard_tags"] >= {"live/tokens"}
    assert max(first["live_tokens"]) < two_runs[1].summary["tokens"]  # seen before the end
    _, runs = mlflow_runs((two_runs[1].run_dir / "mlruns").as_uri(), "runtime-test")
    assert len(runs) == 1 and runs[0].info.run_id == first["run_id"] and runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_real_run_logs_training_and_held_out_losses(two_runs):
    result = two_runs[1]  # the tiny two-site run with [tracking] on (conftest.py)
    assert result.summary["num_syncs"] >= 2  # a and b overlap: federated rounds
    losses = pd.read_csv(result.run_dir / "losses.csv")
    evals = losses[losses["kind"] == "eval"].sort_values("t_s")
    assert len(evals) >= 1
    client, runs = mlflow_runs((result.run_dir / "mlruns").as_uri(), "runtime-test")
    assert len(runs) == 1 and runs[0].data.tags["curtail.executor"] == "ray"
    run_id = runs[0].info.run_id
    assert runs[0].data.metrics["summary/final_eval_loss"] == result.summary["final_eval_loss"]
    assert runs[0].data.metrics["summary/tokens"] == result.summary["tokens"]
    assert runs[0].data.params["training.preset"] == "tiny"
    history = sorted(client.get_metric_history(run_id, "loss/eval"), key=lambda m: m.timestamp)
    assert [m.value for m in history] == evals["loss"].to_list()
    assert [m.step for m in history] == [round(t) for t in evals["tokens"]]  # step = tokens trained
    assert [m.timestamp for m in history] == [round(1000 * t) for t in evals["t_s"]]
    for site in ("a", "b"):
        trained = losses[(losses["kind"] == "train") & (losses["site"] == site)]
        recorded = client.get_metric_history(run_id, f"loss/train/{site}")
        assert sorted(m.value for m in recorded) == sorted(trained["loss"].to_list())
    found = scalars(result.run_dir / "tensorboard")
    assert [e.value for e in found["loss/eval"]] == pytest.approx(evals["loss"].to_list(), rel=1e-6)
    assert math.isfinite(found["summary/final_eval_loss"][-1].value)


@pytest.mark.slow
def test_sweep_trials_go_through_rays_mlflow_and_tensorboard_callbacks(ray_cluster, tmp_path):
    from test_sweep import SMALL_SWEEP, paper_with_sweep

    config = paper_with_sweep(**SMALL_SWEEP)
    config["tracking"] = ON
    result = curtail.sweep(config, output_dir=tmp_path)
    trials = result.trials.set_index("trial_id")
    _, runs = mlflow_runs((tmp_path / "mlruns").as_uri(), "paper_policies-sweep")
    assert len(runs) == len(trials) == 3
    for run in runs:
        trial_id = next(t for t in trials.index if run.data.tags["trial_name"].endswith(t))
        row = trials.loc[trial_id]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["emissions_kg"] == row["emissions_kg"]
        assert run.data.metrics["hours"] == row["hours"]
        assert run.data.params["variant/kind"] == row["config/variant/kind"] == row["policy"]
    events = sorted((tmp_path / "tune").rglob("events.out.tfevents.*"))
    assert len(events) == 3
    by_trial = {}
    for event_file in events:
        found = scalars(event_file.parent)
        trial_id = next(t for t in trials.index if t in event_file.parent.name)
        by_trial[trial_id] = found["ray/tune/emissions_kg"][-1].value
    assert by_trial == pytest.approx(trials["emissions_kg"].to_dict(), rel=1e-6)
