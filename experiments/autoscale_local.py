"""Sites that scale to zero, measured on one machine: node-up and group-ready times per window.

    .venv/bin/python experiments/autoscale_local.py           # about 2 minutes on a 2-core CPU
    .venv/bin/python experiments/autoscale_local.py --json

Starts a head with Ray's fake multi-node autoscaler whose node types are the sites (the cluster
``tests/test_autoscale.py`` runs on: ``LocalSites(autoscale=True)`` in ``tests/local_sites.py``, no
site node up), runs the tiny two-site experiment on it with ``training.autoscaled_sites = true``
(``curtail run`` joining through ``RAY_ADDRESS``), waits for the autoscaler to remove the site
nodes, and prints each window's measured times from the run's ``site_capacity.csv``: seconds from
the capacity request to the site's first node, to its worker group's first answer, and how long
the node stayed after the site was released; then the run's start-ups accounted as measured
beside the configured model (``summary.json`` → ``provisioning_measured``). docs/DEPLOYMENT.md
and docs/BENCHMARKS.md record the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from local_sites import STEP_TOKENS, LocalSites, run_dir_of, write_tiny_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="autoscale-"))
    config = write_tiny_experiment(folder, name="autoscaled", token_budget=31 * STEP_TOKENS, autoscaled_sites=True)
    cluster = LocalSites({"a": 1, "b": 1}, autoscale=True).start()
    try:
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "curtail", "run", str(config)], check=False, cwd=REPO,
                              env=cluster.env(), capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-4000:])
        wall_s = time.time() - started
        counts = pd.read_csv(run_dir_of(config) / "site_node_counts.csv")
        gone_at: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # when each site's node is gone after the run
            nodes = {node["labels"].get("site") for node in cluster.nodes()}
            for site in ("a", "b"):
                if site not in nodes and site not in gone_at:
                    gone_at[site] = time.time()
            if len(gone_at) == 2:
                break
            time.sleep(0.5)
    finally:
        cluster.stop()
    windows = pd.read_csv(run_dir_of(config) / "site_capacity.csv")
    rows = []
    for window in windows.itertuples():
        mine = counts[(counts.site == window.site) & (counts.wall_s > window.released_wall_s) & (counts.nodes == 0)]
        gone = float(mine.wall_s.min()) if len(mine) else gone_at.get(window.site, float("nan"))
        rows.append({
            "site": window.site, "nodes_before": int(window.nodes_before),
            "node_up_s": round(float(window.node_start_s), 1), "group_ready_s": round(float(window.group_ready_s), 1),
            "node_gone_after_release_s": round(gone - float(window.released_wall_s), 1),
        })
    measured = json.loads((run_dir_of(config) / "summary.json").read_text())["provisioning_measured"]
    result = {"run_wall_s": round(wall_s, 1), "idle_timeout_s": cluster.idle_timeout_s, "windows": rows,
              "provisioning_measured": measured}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"run wall time {result['run_wall_s']} s, autoscaler idle timeout {cluster.idle_timeout_s:g} s")
    print("| site | nodes up at request | node up (s) | group ready (s) | node gone after release (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['site']} | {row['nodes_before']} | {row['node_up_s']} | {row['group_ready_s']} | "
              f"{row['node_gone_after_release_s']} |")
    print(f"\nstart-ups, measured vs modelled ({measured['modelled_start_s']:g} s per window):")
    print("| site | windows | measured s | modelled s | measured kWh | modelled kWh | measured g CO2 | modelled g CO2 |")
    print("|---|---|---|---|---|---|---|---|")
    for site, f in [*measured["by_site"].items(), ("total", measured["total"])]:
        print(f"| {site} | {f['num_windows']} | {f['measured_s']:.1f} | {f['modelled_s']:.0f} | {f['measured_kwh']:.4f} | "
              f"{f['modelled_kwh']:.4f} | {1000 * f['measured_kg']:.2f} | {1000 * f['modelled_kg']:.2f} |")


if __name__ == "__main__":
    main()
