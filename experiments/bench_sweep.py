"""Benchmark: a Ray Tune sweep of >= 100 simulator trials over scheduling policies.

    .venv/bin/python experiments/bench_sweep.py                # 3 kinds × 40 samples = 120 trials
    .venv/bin/python experiments/bench_sweep.py --num-samples 60 --json

Runs ``experiments/sweep_policies.toml`` exactly as ``curtail sweep`` does (threshold,
forecast-aware and budget-aware policies with sampled knobs; every trial simulates 15 days of
CAISO_NORTH at 5 minutes with WattTime's recorded forecasts), in a temporary output folder.
Timed: the whole call (trace loading, Ray start, Tune, results, Pareto plot, the evaluation on
the other half-month) and Tune's part alone. The machine's cores and load average are printed
beside the time: a loaded machine is slower, and the result says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import curtail

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "sweep_policies.toml"
TARGET_S = 300.0  # the goal: >= 100 trials in <= 5 minutes on a 2-core machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-samples", type=int, default=40, help="samples per policy kind (default 40)"
    )
    parser.add_argument("--max-concurrent", type=int, default=None, help="default: the config's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="curtail-bench-sweep-") as folder:
        started = time.perf_counter()
        result = curtail.sweep(
            CONFIG,
            num_samples=args.num_samples,
            output_dir=Path(folder),
            max_concurrent_trials=args.max_concurrent,
        )
        total_s = time.perf_counter() - started
    record = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "load_average_1_5_15_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "trials": result.num_trials,
        "tune_s": round(result.wall_s, 1),
        "total_s": round(total_s, 1),
        "trials_per_s": round(result.num_trials / result.wall_s, 2),
        "target": f">= 100 trials in <= {TARGET_S:.0f} s",
        "met": bool(result.num_trials >= 100 and total_s <= TARGET_S),
        "chosen": result.best["policy"],
    }
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        print(
            f"{record['trials']} simulator trials: {record['total_s']} s in all, {record['tune_s']} s in Tune "
            f"({record['trials_per_s']} trials/s) on {record['machine']}; load average "
            f"{record['load_average_1_5_15_before']} before, {record['load_average_1_5_15_after']} after; "
            f"target {record['target']}: {'met' if record['met'] else 'NOT met'}"
        )
    return 0 if record["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
