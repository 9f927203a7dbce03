"""Does better information ever hurt a policy? Perfect vs synthetic vs no forecasts, per period.

    .venv/bin/python experiments/information_monotonicity.py                 # mpc, about a minute
    .venv/bin/python experiments/information_monotonicity.py --kind budget --seeds 5

For each period of the evaluation protocol's datasets (:mod:`curtail.policy_eval`: its token
budget, sites and rules; tune periods included, as nothing is tuned here) the policy runs with
no forecasts, with synthetic forecasts from the calibrated error model (``--seeds`` seeds, mean)
and with perfect ones over the same horizon (the same model with ``forecast_error_scale = 0``).
A sound policy is monotonic: perfect ≤ synthetic ≤ none. The table is in ``docs/POLICIES.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics

from curtail import policy_eval

PERIODS = (("caiso", 0), ("caiso", 1), ("sgip", 0), ("sgip", 3), ("average", 0), ("average", 3))
"""(dataset, index into its tune + evaluation periods)."""


def compare(kind: str, dataset_name: str, index: int, seeds: int) -> dict[str, float]:
    """Mean emissions (kg) of ``kind`` with perfect, synthetic and no forecasts on one period."""
    dataset = policy_eval.DATASETS[dataset_name]
    period = (dataset.tune + dataset.evaluate)[index]
    policies = {"none.0": {"kind": kind, "forecast": "none"}}
    for seed in range(seeds):
        synthetic = {"kind": kind, "forecast": "synthetic", "forecast_seed": seed}
        policies[f"synthetic.{seed}"] = synthetic
        policies[f"perfect.{seed}"] = {**synthetic, "forecast_error_scale": 0.0}
    budget = policy_eval.period_budget(dataset, period, 0.5)
    summaries = policy_eval._summaries(dataset, dataset.experiment(policies, period, budget))
    return {
        info: statistics.fmean(s["emissions_kg"] for name, s in summaries.items() if name.split(".")[0] == info)
        for info in ("perfect", "synthetic", "none")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="mpc", help="a forecast-reading policy kind (mpc, budget, forecast)")
    parser.add_argument("--seeds", type=int, default=3, help="synthetic-forecast seeds per period")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # percentile rules warn about short history at a year's start
    print("| period | perfect kg | synthetic kg | none kg | monotonic |")
    print("|---|---|---|---|---|")
    for dataset_name, index in PERIODS:
        result = compare(args.kind, dataset_name, index, args.seeds)
        dataset = policy_eval.DATASETS[dataset_name]
        start = (dataset.tune + dataset.evaluate)[index][0]
        ok = result["perfect"] <= result["synthetic"] <= result["none"]
        print(f"| {dataset_name} {start[:10]} | {result['perfect']:.3f} | {result['synthetic']:.3f} | "
              f"{result['none']:.3f} | {'yes' if ok else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
