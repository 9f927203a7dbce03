"""The live demo against a virtual-clock run of the same trace, both real training on Ray.

    .venv/bin/python experiments/compare_live.py            # about 10 minutes on a 2-core CPU
    .venv/bin/python experiments/compare_live.py --json

Runs ``experiments/live_demo.toml`` (the paper trace served as the WattTime API at 150x, followed
live on the real-time clock), then the same sites, rules and model on the same trace file with the
virtual clock and the live run's start and deadline, then ``curtail replay`` of the live run.
Reports the live run's wall time, whether its provision / drain / round / sync decisions match
the virtual run's (and by how much their instants differ), and the two runs' emissions and share
of energy in windows. docs/LIVE.md records the result.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import curtail
from curtail.api import decisions
from curtail.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
LIVE = REPO / "experiments" / "live_demo.toml"


def _stamp(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, UTC).isoformat().replace("+00:00", "Z")


def virtual_twin(start_s: float, finish_s: float) -> dict:
    """The live demo on its trace file, virtual clock, from the live run's start to its end."""
    config = load_experiment(LIVE).model_dump(mode="json")
    live = config.pop("live")
    config["name"] = "live-demo-virtual"
    config["traces"] = [{"path": live["source"]["path"]}]
    config["training"]["clock"] = "virtual"
    config["runs"] = [{**run, "start": _stamp(start_s), "deadline": _stamp(finish_s)} for run in config["runs"]]
    return config


def compare() -> dict:
    started = time.perf_counter()
    live = curtail.run(LIVE)
    live_wall_s = time.perf_counter() - started
    start_s, finish_s = live.summary["live"]["start_s"], live.summary["live"]["finish_s"]
    virtual = curtail.run(virtual_twin(start_s, finish_s))
    replayed = curtail.replay(live.run_dir)
    ours, theirs = decisions(live.record.events), decisions(virtual.record.events)
    same_order = [(s, e) for _, s, e in ours] == [(s, e) for _, s, e in theirs]
    shifts = [abs(a[0] - b[0]) for a, b in zip(ours, theirs)] if same_order else []
    return {
        "live_run_dir": str(live.run_dir),
        "live_wall_s": round(live_wall_s, 1),
        "live_hours": live.summary["hours"],
        "decisions": len(ours),
        "decisions_same_order": same_order,
        "max_decision_shift_s": max(shifts, default=None),
        "poll_s": load_experiment(LIVE).rules.poll_s,
        "emissions_kg": {"live": live.summary["emissions_kg"], "virtual": virtual.summary["emissions_kg"]},
        "share_energy_in_windows": {"live": live.summary["share_energy_in_windows"],
                                    "virtual": virtual.summary["share_energy_in_windows"]},
        "energy_kwh": {"live": live.summary["energy_kwh"], "virtual": virtual.summary["energy_kwh"]},
        "tokens": {"live": live.summary["tokens"], "virtual": virtual.summary["tokens"]},
        "ledger_exact": live.summary["ledger_trained_tokens"] == live.summary["tokens"],
        "readings": live.summary["live"]["readings"],
        "late_readings": live.summary["live"]["late_readings"],
        "replay_decisions_match": replayed.summary["decisions_match_run"],
        "final_eval_loss": {"live": live.summary["final_eval_loss"], "virtual": virtual.summary["final_eval_loss"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
