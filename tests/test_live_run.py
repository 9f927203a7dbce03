"""A live run on Ray: the first two hours of the scripted trace served as the WattTime API at
60x, followed on the real-time clock with real training (two minutes of wall time: the worker
groups' real start, tens of seconds here, is a long stretch of the run's clock at this speed). Its provision / drain / round decisions are the
offline simulation's of the same trace, its accounting matches it, its ledger is exact, the
real-time clock follows the wall, and ``curtail.replay`` of what it recorded reproduces its
decisions."""

from __future__ import annotations

import json

import pytest
from runtime_fixtures import tiny_experiment

import curtail
from curtail.api import DECISION_EVENTS
from curtail.sources.live_feed import READINGS_FILE, read_readings

pytestmark = pytest.mark.slow



def decisions(events) -> list[tuple[float, str, str]]:
    rows = events[events["event"].isin(DECISION_EVENTS)]
    return [(round(float(t), 3), str(s), str(e)) for t, s, e in zip(rows["t_s"], rows["site"].fillna(""), rows["event"])]


def live_experiment(tmp) -> dict:
    experiment = tiny_experiment(tmp)
    trace = experiment.pop("traces")[0]["path"]
    experiment["name"] = "live-test"
    experiment["live"] = {"source": {"kind": "served_trace", "path": trace}, "duration_s": 2 * 3600}
    experiment["training"] = {**experiment["training"], "clock": "realtime", "realtime_speedup": 60.0,
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
    """Two hours of trace at 60x take at least 120 s of wall time; the work done in it is what
    the ledger recorded, site by site."""
    summary = live_run[0].summary
    assert summary["wall_s"] >= 2 * 3600 / 60 - 1
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
