"""Experiment: held-out loss of the curtailment-aware run vs a centralized run, same budget.

    .venv/bin/python experiments/compare_centralized.py            # ~10 min on 2 CPU cores

Takes the main job (``experiments/demo.toml``: 3 sites on the paper trace, ``small`` preset,
300k tokens of Tiny Shakespeare) and adds the centralized baseline: one site (South
Australia), always on, the same model, data, seed, LR schedule and token budget. Both run for
real on a local Ray cluster; the final global models are scored on the same held-out batches.
The prior system reported its federated model within 0.3 perplexity of the centralized one.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/demo.toml"))
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args()

    import curtail
    from curtail.config import RunSpec, load_experiment

    experiment = load_experiment(args.config)
    centralized = RunSpec(name="centralized-nem_sa", policy={"kind": "always_on"}, sites=["nem_sa"],
                          rules=experiment.rules.replace(provisioning_s=0),
                          execution=experiment.execution.replace(group_start_s=0))
    experiment = experiment.replace(runs=[*experiment.runs, centralized])
    rows = []
    for spec in experiment.runs:
        result = curtail.run(experiment, run=spec.name, output_dir=args.output_dir)
        s = result.summary
        rows.append({"run": s["run"], "tokens": s["tokens"], "final_eval_loss": s["final_eval_loss"],
                     "perplexity": math.exp(s["final_eval_loss"]), "emissions_kg": s["emissions_kg"],
                     "hours": s["hours"], "wall_s": s["wall_s"], "run_dir": str(result.run_dir)})
    print(json.dumps(rows, indent=2))
    aware, central = rows
    print(f"held-out loss {aware['final_eval_loss']:.4f} (curtailment-aware) vs {central['final_eval_loss']:.4f} "
          f"(centralized): perplexity {aware['perplexity']:.2f} vs {central['perplexity']:.2f}, "
          f"difference {aware['perplexity'] - central['perplexity']:+.2f}")


if __name__ == "__main__":
    main()
