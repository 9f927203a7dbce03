"""Benchmark: simulate a year of 5-minute carbon intensity for 3 sites.

    .venv/bin/python experiments/bench_simulator.py            # prints a table, --json for machines

The year is built from real traces, upsampled to 5 minutes (each sample held until the next):
Germany's and Great Britain's 2020 average intensity (15 / 30 min) and the CAISO_NORTH June
2023 MOER month repeated to cover the year. Curtailment is "below 150 gCO2/kWh" so every
site has many windows (GB crosses often, Germany rarely, CAISO daily). The token budget is
set high enough that the run spans the whole year. Timed separately: trace loading and
validation, the event-driven simulation (calendar + policy + executor), the accounting
(summary and per-site timeseries) and writing the run directory. Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from curtail.config import parse_experiment
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.simulator import Simulator
from curtail.runlog import record_of, write_run_dir

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"
YEAR = pd.date_range("2020-01-01", "2020-12-31 23:55", freq="5min", tz="UTC")


def _year_at_5min(series: pd.Series) -> np.ndarray:
    return series.sort_index().reindex(YEAR, method="ffill").bfill().to_numpy()


def build_year_trace(folder: Path) -> Path:
    germany = pd.read_csv(TRACES / "avg_ci_2020_germany.csv", index_col=0, parse_dates=True)
    britain = pd.read_csv(TRACES / "avg_ci_2020_great-britain.csv", index_col=0, parse_dates=True)
    caiso = pd.read_csv(TRACES / "watttime_moer_2023-06_caiso-north_actual.csv", index_col=0, parse_dates=True)
    caiso_values = caiso.iloc[:, 0].to_numpy()
    frame = pd.DataFrame(
        {
            "time": YEAR.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
            "DE": _year_at_5min(germany.iloc[:, 0].tz_localize("UTC")),
            "GB": _year_at_5min(britain.iloc[:, 0].tz_localize("UTC")),
            "CAISO_NORTH": np.resize(caiso_values, len(YEAR)),
        }
    )
    path = folder / "year_5min_3regions.csv"
    frame.to_csv(path, index=False)
    return path


def experiment(trace: Path, policy: str) -> dict:
    site = {"num_gpus": 4, "training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": 191_454}
    return {
        "name": "bench",
        "token_budget": 1e16,
        "traces": [{"path": str(trace), "max_gap_s": 3600}],
        "rules": {"threshold_g_per_kwh": 150},
        "sites": {name.lower(): {"region": name, **site} for name in ("DE", "GB", "CAISO_NORTH")},
        "runs": [{"name": f"year-{policy}", "policy": {"kind": policy}, "sites": ["de", "gb", "caiso_north"]}],
    }


def bench(policy: str, trace: Path, out: Path) -> dict:
    config = parse_experiment(experiment(trace, policy))
    t0 = time.perf_counter()
    traces, forecasts = load_experiment_traces(config)
    plan = plan_run(config, config.runs[0], traces, forecasts)
    t1 = time.perf_counter()
    trajectory = Simulator(plan.context, plan.policy).run()
    t2 = time.perf_counter()
    record = record_of(plan, trajectory, config, executor="simulator", traces_checksums=traces.checksums)
    t3 = time.perf_counter()
    write_run_dir(record, out / policy)
    t4 = time.perf_counter()
    return {
        "policy": policy,
        "samples_per_site": len(YEAR),
        "events": len(trajectory.events),
        "windows": len(plan.calendar.windows()),
        "load_and_plan_s": t1 - t0,
        "simulate_s": t2 - t1,
        "account_s": t3 - t2,
        "write_s": t4 - t3,
        "total_s": t4 - t0,
        "simulated_hours": record.summary["hours"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = build_year_trace(folder)
        results = []
        for policy in ("threshold", "always_on"):
            runs = [bench(policy, trace, folder / f"run{i}") for i in range(args.repeat)]
            best = min(runs, key=lambda r: r["simulate_s"] + r["account_s"])
            results.append(best)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"python {platform.python_version()}, {platform.machine()}, best of {args.repeat}")
    print(f"{'policy':<10} {'windows':>7} {'events':>7} {'load+plan s':>11} {'simulate s':>10} "
          f"{'account s':>9} {'write s':>8} {'total s':>8}")
    for r in results:
        print(f"{r['policy']:<10} {r['windows']:>7} {r['events']:>7} {r['load_and_plan_s']:>11.3f} "
              f"{r['simulate_s']:>10.3f} {r['account_s']:>9.3f} {r['write_s']:>8.3f} {r['total_s']:>8.3f}")


if __name__ == "__main__":
    main()
