"""A live run on Ray: the first two hours of the scripted trace served as the WattTime API at
75x, followed on the real-time clock with real training (96 s of wall time: the worker groups'
real starts, 23–39 s each here and one after the other, are a long stretch of the run's clock at
this speed; at 100x two slow starts left no time to train). Its
provision / drain / round decisions are the offline simulation's of the same trace, its
accounting matches it, its ledger is exact, the real-time clock follows the wall, and
``curtail.replay`` of what it recorded reproduces its decisions. A second run meets four signal
faults and a killed coordinator: it resumes at the grid's now and reaches its budget exactly."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from runtime_fixtures import STEP_TOKENS, tiny_experiment

import curtail
from curtail.api import DECISION_EVENTS
from curtail.sources.live_feed import READINGS_FILE, read_readings

pytestmark = pytest.mark.slow

SPEEDUP = 75.0  # trace seconds per wall second



def decisions(events) -> list[tuple[float, str, str]]:
    rows = events[events["event"].isin(DECISION_EVENTS)]
    return [(round(float(t), 3), str(s), str(e)) for t, s, e in zip(rows["t_s"], rows["site"].fillna(""), rows["event"])]


def live_experiment(tmp) -> dict:
    experiment = tiny_experiment(tmp)
    trace = experiment.pop("traces")[0]["path"]
    experiment["name"] = "live-test"
    experiment["live"] = {"source": {"kind": "served_trace", "path": trace}, "duration_s": 2 * 3600}
    experiment["training"] = {**experiment["training"], "clock": "realtime", "realtime_speedup": SPEEDUP,
                              "power": "model"}
    return experiment


def offline_experiment(tmp) -> dict:
    experiment = tiny_experiment(tmp)
    experiment["runs"][0]["deadline"] = "2026-01-11T02:00:00Z"
    return experiment


@pytest.fixture(scope="module")
def live_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    return curtail.run(live_experiment(tmp), output_dir=tmp / "runs"), offline_experiment(tmp)


def test_a_live_run_decides_as_the_offline_simulation(live_run):
    result, offline_config = live_run
    offline = curtail.simulate(offline_config, write=False).records[0]
    assert decisions(result.record.events) == decisions(offline.events)
    assert len(decisions(offline.events)) > 10
    summary, expected = result.summary, offline.summary
    assert summary["live"]["source"] == "served_trace"
    assert summary["live"]["readings"] == 2 * 24 and summary["live"]["late_readings"] == 0
    assert summary["hours"] == pytest.approx(expected["hours"])
    assert summary["share_energy_in_windows"] == pytest.approx(expected["share_energy_in_windows"], rel=0.02)
    assert summary["emissions_kg"] == pytest.approx(expected["emissions_kg"], rel=0.02)
    assert summary["ledger_trained_tokens"] == summary["tokens"] > 0


def test_the_real_time_clock_follows_the_wall(live_run):
    """Two hours of trace at 75x take at least 96 s of wall time; the work done in it is what
    the ledger recorded, site by site."""
    summary = live_run[0].summary
    assert summary["wall_s"] >= 2 * 3600 / SPEEDUP - 1
    assert summary["ledger_trained_by_site"] == {k: int(v) for k, v in summary["tokens_by_site"].items()}


def test_replaying_the_recorded_signal_reproduces_the_decisions(live_run):
    result, _ = live_run
    readings = read_readings(result.run_dir)
    lines = (result.run_dir / READINGS_FILE).read_text().splitlines()
    assert len(readings) == len(lines) == result.summary["live"]["readings"]
    assert {json.loads(line)["origin"] for line in lines} == {"source"}
    replayed = curtail.replay(result.run_dir)
    assert decisions(replayed.events) == decisions(result.record.events)
    assert replayed.summary["decisions_match_run"] and replayed.summary["decisions"] > 10
    assert (result.run_dir / "replay" / "summary.json").is_file()


# ------------------------------------------------------------------ faults and a crash, live

SIGNAL_FAULTS = [  # trace seconds after the run's start; each shorter than max_stale_s: the last value serves
    {"at_s": 600, "kind": "server_errors", "count": 3},
    {"at_s": 1200, "kind": "slow", "count": 2, "delay_s": 3.0},  # beyond the 1 s timeout
    {"at_s": 1500, "kind": "refuse_credentials", "duration_s": 240},
    {"at_s": 1980, "kind": "down", "duration_s": 240},  # recovered at 00:37, while a trains alone
]
# whole steps: a budget the real-time clock meets exactly. The real-time clock is the wall at 120x
# and the sites train as fast as this machine lets them (idle, with torch 2.13: ~200 steps a wall
# second; a alone from 00:09:30 to 00:44:30 is 17.5 s of wall, up to ~3,500 steps), so the budget
# must outlast a's lone start (the kill comes in the first federated round) on a fast machine, yet
# end before 07:00 on a slow one (at 15 steps a second per site, ~06:00).
FAULTED_BUDGET = 5000 * STEP_TOKENS
# A lone site publishes its weights every checkpoint_interval_s of the clock and a checkpoint
# follows; a federated round checkpoints only at a sync where no site holds undelivered work,
# which on a fast machine may not come before the budget. So the kill waits for a checkpoint
# taken after the last fault's recovery while a trained alone: every fault's events are kept.
KILL_AFTER_CLOCK = "2026-01-11T00:37:30Z"


def long_windows_csv(path):
    """Eight hours: a curtailed from 0:05 to 7:00, b from 0:40 to 7:30 (room for a restart)."""
    times = pd.date_range("2026-01-11 00:00", periods=96, freq="5min", tz="UTC")
    minutes = np.arange(96) * 5
    frame = pd.DataFrame({"time": times.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
                          "A": np.where((minutes >= 5) & (minutes < 420), 20.0, 400.0),
                          "B": np.where((minutes >= 40) & (minutes < 450), 30.0, 450.0)})
    frame.to_csv(path, index=False)
    return path


def _kill_coordinator_once(runs: Path, after_clock: str, after_tokens: float):
    """SIGKILL the coordinator once, mid-round (FEDERATED), once its newest checkpoint was taken at
    or after ``after_clock`` (ISO, UTC: the events before it are kept) and ``after_tokens`` are
    trained. A real-time run checkpoints only where no site holds undelivered work, so when its
    checkpoints come depends on the machine's pace: the checkpoint's own clock is what counts."""
    killed: list[dict] = []
    after_s = datetime.fromisoformat(after_clock).timestamp()  # Python 3.11 reads the Z

    def newest_checkpoint_t_s() -> float:
        folders = sorted(runs.glob("*/*/checkpoints/0*"), key=lambda path: int(path.name))
        try:
            return float(json.loads((folders[-1] / "executor.json").read_text())["t_s"])
        except (IndexError, OSError):  # none yet, or pruned while we looked
            return float("-inf")

    def callback(progress: dict) -> None:
        pid = progress.get("coordinator_pid")
        if killed or not pid or progress.get("mode") != "FEDERATED" or progress.get("tokens", 0) <= after_tokens:
            return
        if newest_checkpoint_t_s() >= after_s:
            os.kill(pid, signal.SIGKILL)
            killed.append({"pid": pid, "tokens": progress["tokens"], "clock": progress["clock"]})

    return callback, killed


@pytest.fixture(scope="module")
def faulted_run(ray_cluster, tmp_path_factory):
    """The eight-hour scripted trace at 120x with the signal failing four ways, and the
    coordinator killed mid-run: it resumes at the grid's now and trains to the budget."""
    tmp = tmp_path_factory.mktemp("live-faults")
    experiment = live_experiment(tmp)
    experiment["token_budget"] = FAULTED_BUDGET
    experiment["live"]["source"].update(path=str(long_windows_csv(tmp / "long.csv")), faults=SIGNAL_FAULTS,
                                        timeout_s=1.0)
    experiment["live"].update(duration_s=8 * 3600, max_stale_s=600, retry_s=60)
    experiment["training"].update(realtime_speedup=120.0, checkpoint_interval_s=240)
    callback, killed = _kill_coordinator_once(tmp / "runs", after_clock=KILL_AFTER_CLOCK, after_tokens=15_000)
    result = curtail.run(experiment, output_dir=tmp / "runs", on_progress=callback, progress_interval_s=1.0)
    return result, killed


def test_signal_faults_are_events_and_the_run_reaches_its_budget(faulted_run):
    from curtail.runtime.checkpoint import audit_journal

    result, _ = faulted_run
    events, summary = result.record.events, result.summary
    signal_events = events[events["event"].str.startswith("signal_")]
    details = " ".join(signal_events["details"])
    assert {"signal_failed", "signal_recovered"} <= set(signal_events["event"])
    for evidence in ("HTTP 503", "no answer within", "check the credentials", "connect"):  # 5xx, timeout, auth, down
        assert evidence in details, f"no signal event says {evidence!r}"
    assert summary["completed"] and summary["tokens"] == FAULTED_BUDGET
    assert summary["ledger_trained_tokens"] == summary["tokens"]
    assert summary["ledger_trained_by_site"] == {k: int(v) for k, v in summary["tokens_by_site"].items() if v}
    assert audit_journal(result.run_dir)["mismatched_tokens"] == 0


def test_a_killed_coordinator_resumes_live_at_now(faulted_run):
    result, killed = faulted_run
    assert len(killed) == 1 and len(result.summary["restarts"]) == 1
    events = result.record.events
    [lost] = [json.loads(d) for d in events[events["event"] == "lost_time"]["details"]]
    assert lost["to_s"] - lost["from_s"] >= 120 * 5  # at 120x the restart takes > 5 s of wall
    intervals = result.record.intervals
    during = intervals[(intervals["start_s"] < lost["to_s"]) & (intervals["end_s"] > lost["from_s"])]
    assert not (during["state"] != "off").any()  # nothing provisioned, nothing trained while down
    assert (intervals[intervals["start_s"] >= lost["to_s"]]["state"] == "training").any()
    replayed = curtail.replay(result.run_dir, write=False)
    assert replayed.summary["decisions_match_run"], replayed.summary["first_difference"]
