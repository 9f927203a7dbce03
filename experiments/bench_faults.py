"""Benchmark: the fault-injection suite, measured — what survives each fault, what is trained again.

    .venv/bin/python experiments/bench_faults.py                       # all scenarios, ~10 min on 2 cores
    .venv/bin/python experiments/bench_faults.py --scenarios baseline coordinator --json out.json

Each scenario is the tests' tiny two-site run (``tests/runtime_fixtures.py``: sites a and b on
a scripted 4-hour trace, SINGLE → FEDERATED → SINGLE → IDLE → SINGLE, seed 7) on one local Ray
cluster (2 CPUs, no dashboard), with one fault injected from the driver's progress callback
once the run is federated and past 5,000 tokens (``checkpoint_interval_s = 240``, so progress
comes every 240 s of the run's clock and the first report past 5,000 is mid-round):

- ``baseline``: no fault, run twice (the same seed: the spread is the noise floor);
- ``site_worker``: site b's rank-0 worker process is SIGKILLed mid-round;
- ``averager``: the averaging actor's process is SIGKILLed (the run resumes by itself);
- ``coordinator``: the coordinator actor's process is SIGKILLed (the run resumes by itself);
- ``coordinator_manual``: the same with ``max_restarts=0``: the run fails, then
  ``curtail.run(resume=RUN_DIR)`` (= ``curtail run --resume RUN_DIR``) continues it;
- ``drain_during_sync``: not a crash but the race: b's window closes 2 s into a federated
  sync (rules tuned with the simulator so the drain lands there); compared with its simulation.

For each it reports what survived, the tokens trained twice (the ledger's ``retrained``
ranges, from the run's ledger journal), the run clock rewound and the wall time lost, final
tokens and held-out loss against the baseline, and the invariants the tests assert: tokens =
ledger, journal audit (every position trained once, plus once per journaled re-training),
identical weights at every sync. Prints a markdown table (the one in docs/FAULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["baseline", "site_worker", "averager", "coordinator", "coordinator_manual", "drain_during_sync"]


def tiny_experiment(tmp: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from runtime_fixtures import tiny_experiment as make

    return make(tmp)


def drain_during_sync(experiment: dict, offset_s: float = 2.0) -> tuple[dict, float]:
    """The experiment with b's window closing ``offset_s`` into a federated sync (both sites in
    it); returns it and the sync's run-clock instant. b's signal rises at 100 minutes (80 earlier
    than in the tiny trace, 20 before a's); the hysteresis is chosen (on a 1-s poll) so that the calendar's close
    lands in the sync. The simulator, which executes the same state machine, checks it."""
    import pandas as pd

    import curtail

    trace = Path(experiment["traces"][0]["path"])
    frame = pd.read_csv(trace)
    minutes = pd.Series(range(len(frame))) * 5
    frame.loc[(minutes >= 100) & (minutes < 180), "B"] = 450.0  # b's window now closes before a's
    changed = trace.with_name("trace-drain.csv")
    frame.to_csv(changed, index=False)
    experiment = {**experiment, "traces": [{"path": str(changed)}],
                  "rules": {**experiment["rules"], "poll_s": 1.0}}
    rise_s = pd.Timestamp(frame.time.iloc[0]).timestamp() + 100 * 60
    events = curtail.simulate(experiment, write=False).records[0].events
    both = events.details.map(lambda d: sorted(json.loads(d).get("sites", [])) == ["a", "b"])
    syncs = events[(events.event == "sync") & (events.t_s > rise_s) & both]
    sync_s = float(syncs.t_s.iloc[0])
    experiment["rules"]["hysteresis_s"] = sync_s + offset_s - rise_s
    events = curtail.simulate(experiment, write=False).records[0].events
    drain = events[(events.event == "drain") & (events.site == "b")]
    if drain.empty or json.loads(drain.details.iloc[0]).get("previous") != "syncing":
        raise RuntimeError(f"b's drain did not land in the sync at {sync_s}: {drain.to_dict('records')}")
    return experiment, sync_s


def kill_once(what: str, after_tokens: float = 5000.0) -> tuple[Any, dict]:
    """A progress callback that SIGKILLs ``what`` (a site name, "coordinator" or "averager")
    once, when the run is federated and past ``after_tokens``."""
    killed: dict[str, Any] = {}

    def callback(progress: dict) -> None:
        if what in ("coordinator", "averager"):
            pid = progress.get(f"{what}_pid")
        else:
            pid = progress.get("site_pids", {}).get(what)
        if not killed and pid and progress.get("mode") == "FEDERATED" and progress.get("tokens", 0) > after_tokens:
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, tokens=progress["tokens"], clock=progress["clock"], wall=time.time())

    return callback, killed


def weights_identical(summary: dict) -> bool:
    return all(len(entry["digests"]) <= 1 for entry in summary["weight_digests"])  # 0: every loader failed


def measure(name: str, tmp: Path) -> dict[str, Any]:
    import ray

    import curtail
    from curtail.runtime.checkpoint import audit_journal
    from curtail.runtime.cluster import remove_stale_placement_groups

    tmp.mkdir(parents=True, exist_ok=True)
    experiment = tiny_experiment(tmp)
    # progress (and so the faults) every 240 s of the run's clock, mid-round, not only at syncs
    experiment["training"]["checkpoint_interval_s"] = 240
    row: dict[str, Any] = {"scenario": name}
    started = time.perf_counter()
    if name == "baseline":
        result = curtail.run(experiment, output_dir=tmp / "runs")
    elif name in ("site_worker", "averager", "coordinator"):
        callback, killed = kill_once("b" if name == "site_worker" else name)
        result = curtail.run(experiment, output_dir=tmp / "runs", on_progress=callback, progress_interval_s=0.3)
        row["killed_at_tokens"] = killed.get("tokens")
    elif name == "coordinator_manual":
        callback, killed = kill_once("coordinator")
        try:
            curtail.run(experiment, output_dir=tmp / "runs", on_progress=callback, progress_interval_s=0.3,
                        max_restarts=0)
            raise RuntimeError("the coordinator was never killed")
        except ray.exceptions.RayActorError:
            pass
        row["killed_at_tokens"] = killed.get("tokens")
        (run_dir,) = (tmp / "runs" / experiment["name"]).iterdir()
        remove_stale_placement_groups(["a", "b"])
        result = curtail.run(resume=run_dir)
    elif name == "drain_during_sync":
        experiment, sync_s = drain_during_sync(experiment)
        result = curtail.run(experiment, output_dir=tmp / "runs")
        simulated = curtail.simulate(experiment, write=False).records[0].summary
        row["simulated_tokens"] = simulated["tokens"]
        events = result.record.events
        drain = events[(events.event == "drain") & (events.site == "b")]
        row["drain_previous_state"] = json.loads(drain.details.iloc[0]).get("previous")
        row["drain_after_sync_s"] = float(drain.t_s.iloc[0]) - sync_s
    else:
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    row["wall_s"] = time.perf_counter() - started
    summary = result.summary
    audit = audit_journal(result.run_dir)
    row.update(
        tokens=summary["tokens"], hours=summary["hours"], final_eval_loss=summary["final_eval_loss"],
        completed=summary["completed"], stop_reason=summary.get("stop_reason"),
        restarts=len(summary["restarts"]), resumed=summary["resumed"],
        site_failures=summary["site_failures"], tokens_lost_to_failures=summary["tokens_lost_to_failures"],
        retrained_tokens=summary["ledger_retrained_tokens"], retrained=summary["ledger_retrained"],
        resumes=summary["resumes"], journal_mismatched_tokens=audit["mismatched_tokens"],
        tokens_equal_ledger=summary["tokens"] == summary["ledger_trained_tokens"],
        weights_identical_at_syncs=weights_identical(summary), num_syncs=summary["num_syncs"],
        run_dir=str(result.run_dir),
    )
    return row


SURVIVED = {
    "site_worker": "the run, site a's round, every delivered range; b re-provisions and rejoins from the newest global weights",
    "averager": "everything up to the last checkpoint (global weights, outer momentum, ledger, clock); the run resumes by itself",
    "coordinator": "everything up to the last checkpoint; the sites' Ray Train checkpoints (inner AdamW from their last drain)",
    "coordinator_manual": "the run directory: `curtail run --resume` continues from the last checkpoint",
    "drain_during_sync": "b's whole round (submitted in the sync before the drain); a trains on alone (SINGLE)",
}


def table(rows: list[dict[str, Any]]) -> str:
    baselines = [r for r in rows if r["scenario"] == "baseline"]
    base = baselines[0] if baselines else None
    lines = [
        ("| fault injected | what survived | re-trained tokens (ranges) | run clock rewound (s) | wall lost (s) "
         "| final tokens (baseline) | final held-out loss (Δ vs baseline) | invariants |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        retrained = ", ".join(f"{cause} [{start}, {end})" for cause, _epoch, start, end in row["retrained"]) or "none"
        rewound = sum(r.get("virtual_s_lost", 0.0) for r in row["resumes"])
        wall_lost = sum(r.get("wall_s_lost") or 0.0 for r in row["resumes"])
        ok = (row["tokens_equal_ledger"] and row["journal_mismatched_tokens"] == 0 and row["weights_identical_at_syncs"])
        if base is not None and row is not base:
            tokens = f"{row['tokens']:.0f} ({base['tokens']:.0f})"
            loss = f"{row['final_eval_loss']:.4f} ({row['final_eval_loss'] - base['final_eval_loss']:+.4f})"
            wall = f"{wall_lost:.1f} ({row['wall_s'] - base['wall_s']:+.0f} run wall)"
        else:
            tokens, loss, wall = f"{row['tokens']:.0f}", f"{row['final_eval_loss']:.4f}", "–"
        if row["scenario"] == "drain_during_sync":
            tokens += f", simulated {row['simulated_tokens']:.0f}"
        lines.append(
            f"| {row['scenario']} | {SURVIVED.get(row['scenario'], 'no fault')} "
            f"| {row['retrained_tokens']} ({retrained}) | {rewound:.0f} | {wall} | {tokens} | {loss} "
            f"| {'all hold' if ok else 'BROKEN'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS, choices=SCENARIOS)
    parser.add_argument("--json", type=Path, help="write every measured row here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    import ray

    ray.init(address="local", num_cpus=2, resources={"site_a": 2, "site_b": 2}, include_dashboard=False,
             object_store_memory=300 * 2**20, namespace="curtail-bench-faults", log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
            scenarios = list(args.scenarios)
            if "baseline" in scenarios:  # twice: the same seed, the noise floor
                scenarios.insert(scenarios.index("baseline") + 1, "baseline")
            for index, name in enumerate(scenarios):
                row = measure(name, Path(tmp) / f"{index:02d}-{name}")
                print(json.dumps({k: v for k, v in row.items() if k not in ("retrained", "resumes")}), flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
