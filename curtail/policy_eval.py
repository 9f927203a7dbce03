"""The policy evaluation protocol: tune on some periods, evaluate on others, on every shipped trace.

    curtail evaluate-policies                          # every dataset, a table per dataset
    curtail evaluate-policies --datasets sgip --seeds 3 --json

A **dataset** is a set of shipped traces with sites, rules and periods split in two: *tune*
periods, the only ones any setting may be chosen on, and *evaluation* periods, which report
the results. Each period gets its own token budget: ``budget_fraction`` of what its
curtailment windows could hold (the windows-only bound's capacity), so every policy can meet it
inside windows and the question is only which windows it uses (the paper trace keeps the prior
system's budget).

Every policy kind runs at its defaults; ``budget-tuned`` is the budget policy at the price
(``max_ci_g_per_kwh``) that had the least mean emissions on the tune periods — the only tuned
entry, and tuned on other periods than it is reported on. Policies that read synthetic forecasts
run once per forecast seed (mean ± sd); where a dataset has recorded forecasts, they are used and
one run is enough. Per period and policy: emissions, the share of the threshold policy's excess
over the windows-only bound that the policy removes (``capture`` = (threshold − policy) /
(threshold − bound); 1 = at the bound; not defined where threshold is at the bound), the same
share of the excess over the oracle *run* (``capture_of_oracle_run``: the bound knows no
start-ups or syncs, the oracle run pays them with perfect foresight, so the oracle's own
``capture`` is the most any schedule reached on the period), emissions per billion tokens, share
of energy inside windows, goodput and whether the budget was met.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curtail.config import POLICY_KINDS, ExperimentConfig, parse_experiment
from curtail.planning.oracle import windows_only_bound
from curtail.planning.plan import load_experiment_traces, plan_run
from curtail.planning.simulator import Simulator
from curtail.runlog import summary_of

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
SITE = {"training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": 191_454}  # the paper's sites
MOER_RULES = {"threshold_g_per_kwh": 100, "hysteresis_s": 600, "provisioning_s": 240, "poll_s": 10}
EXECUTION = {"round_s": 600, "sync_s": 5, "group_start_s": 30, "round_restart_s": 0, "join": "immediate"}
FORECAST_KINDS = ("forecast", "budget", "mpc")  # read forecasts: synthetic ones per seed
TUNED_PRICES_G_PER_KWH = (50.0, 65.0, 75.0, 100.0)

Period = tuple[str | None, str | None]  # (start, deadline), ISO UTC; None: the traces' span


def _week(month: int, year: int = 2020, day: int = 1) -> Period:
    return (f"{year}-{month:02d}-{day:02d}T00:00:00Z", f"{year}-{month:02d}-{day + 7:02d}T00:00:00Z")


@dataclass(frozen=True)
class Dataset:
    """Shipped traces, sites and rules, with tune and evaluation periods (see the module doc)."""

    name: str
    traces: list[dict[str, Any]]
    sites: dict[str, str]  # site -> region
    tune: list[Period]
    evaluate: list[Period]
    rules: dict[str, Any] = field(default_factory=lambda: dict(MOER_RULES))
    forecasts: list[dict[str, Any]] = field(default_factory=list)
    token_budget: float | None = None  # fixed; else budget_fraction of each period's window capacity

    @property
    def recorded_forecasts(self) -> bool:
        return bool(self.forecasts)

    def experiment(self, policies: dict[str, dict[str, Any]], period: Period, token_budget: float) -> ExperimentConfig:
        start, deadline = period
        timing = {k: v for k, v in (("start", start), ("deadline", deadline)) if v is not None}
        return parse_experiment({
            "name": self.name, "token_budget": token_budget, "traces": self.traces, "forecasts": self.forecasts,
            "rules": self.rules, "execution": EXECUTION,
            "sites": {site: {"region": region, **SITE} for site, region in self.sites.items()},
            "runs": [{"name": name, "policy": policy, "sites": list(self.sites), **timing}
                     for name, policy in policies.items()],
        })


def _moer(path: str, column: str, region: str) -> dict[str, Any]:
    return {"path": str(TRACES / path), "naive_timezone": "UTC", "columns": {column: region}}


DATASETS: dict[str, Dataset] = {
    "paper": Dataset(  # 18 hours, no past: evaluation only
        "paper", [{"path": str(TRACES / "watttime_moer_2026-01-11_4regions.csv")}],
        {"caiso_north": "CAISO_NORTH", "spp_tx": "SPP_TX", "nem_sa": "NEM_SA"},
        tune=[], evaluate=[(None, None)], token_budget=12_268_339_200,
    ),
    "caiso": Dataset(
        "caiso", [_moer("watttime_moer_2023-06_caiso-north_actual.csv", "Caiso_North", "CAISO_NORTH")],
        {"caiso_north": "CAISO_NORTH"},
        tune=[("2023-06-08T00:00:00Z", "2023-06-15T00:00:00Z"), ("2023-06-15T00:00:00Z", "2023-06-22T00:00:00Z")],
        evaluate=[("2023-06-22T00:00:00Z", "2023-06-29T00:00:00Z"), ("2023-06-29T00:00:00Z", "2023-07-06T00:00:00Z")],
        forecasts=[{"path": str(TRACES / "watttime_moer_2023-06_caiso-north_forecast.csv.gz"),
                    "region": "CAISO_NORTH", "naive_timezone": "UTC"}],
    ),
    "sgip": Dataset(  # tune on the first week of each month of the first half, evaluate on the second
        "sgip",
        [{"path": str(TRACES / f"sgip_moer_2020_caiso-{r}_actual.csv.gz")} for r in ("pge", "sce")],
        {"pge": "SGIP_CAISO_PGE", "sce": "SGIP_CAISO_SCE"},
        tune=[_week(m) for m in range(2, 7)], evaluate=[_week(m) for m in range(7, 13)],
        forecasts=[{"path": str(TRACES / f"sgip_moer_2020_caiso-{r}_forecast.csv.gz"), "region": region}
                   for r, region in (("pge", "SGIP_CAISO_PGE"), ("sce", "SGIP_CAISO_SCE"))],
    ),
    "average": Dataset(  # average intensity: the 20th percentile of the past week is the window
        "average",
        [{"path": str(TRACES / f"avg_ci_2020_{name}.csv"), "signal": "average", "naive_timezone": "UTC",
          "columns": {"Carbon Intensity": region}} for name, region in (("germany", "DE"), ("great-britain", "GB"))],
        {"de": "DE", "gb": "GB"},
        tune=[_week(m) for m in (2, 4)], evaluate=[_week(m) for m in (6, 8, 10, 12)],
        rules={"threshold_kind": "percentile", "threshold_percentile": 20, "hysteresis_s": 600,
               "provisioning_s": 240},
    ),
}


@functools.cache
def _traces(dataset: str) -> tuple[Any, Any]:
    """A dataset's traces and forecasts, read once (every period and policy set shares them)."""
    return load_experiment_traces(DATASETS[dataset].experiment({"probe": {"kind": "threshold"}}, (None, None), 1.0))


def _summaries(dataset: Dataset, experiment: ExperimentConfig) -> dict[str, dict[str, Any]]:
    traces, forecasts = _traces(dataset.name)
    result = {}
    for run in experiment.runs:
        plan = plan_run(experiment, run, traces, forecasts)
        result[run.name] = summary_of(plan, Simulator(plan.context, plan.policy).run(), executor="simulator")
    return result


def period_budget(dataset: Dataset, period: Period, budget_fraction: float) -> float:
    """The period's token budget: fixed, or ``budget_fraction`` of what its windows could hold."""
    if dataset.token_budget is not None:
        return dataset.token_budget
    experiment = dataset.experiment({"probe": {"kind": "threshold"}}, period, 1.0)
    traces, forecasts = _traces(dataset.name)
    plan = plan_run(experiment, experiment.runs[0], traces, forecasts)
    return budget_fraction * windows_only_bound(plan.context, 1.0).capacity_tokens


def _policies(dataset: Dataset, seeds: int, budget_price: float | None) -> dict[str, dict[str, Any]]:
    """Run name -> policy config: every kind at its defaults (forecast readers once per seed)."""
    policies: dict[str, dict[str, Any]] = {}
    kinds = [k for k in ("threshold", "forecast", "budget", "mpc", "oracle") if k in POLICY_KINDS]
    for kind in kinds:
        if kind in FORECAST_KINDS and not dataset.recorded_forecasts:
            for seed in range(seeds):
                policies[f"{kind}.{seed}"] = {"kind": kind, "forecast_seed": seed}
        else:
            policies[f"{kind}.0"] = {"kind": kind}
    if budget_price is not None:
        for name in [n for n in policies if n.startswith("budget.")]:
            policies[name.replace("budget", "budget-tuned")] = {**policies[name], "max_ci_g_per_kwh": budget_price}
    return policies


def _aggregate(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy (seeds pooled): mean and sd of emissions, and the rest's means."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for name, summary in summaries.items():
        by_policy.setdefault(name.split(".")[0], []).append(summary)
    threshold_kg = by_policy["threshold"][0]["emissions_kg"]
    oracle_kg = by_policy["oracle"][0]["emissions_kg"] if "oracle" in by_policy else None

    def share_removed(kg: float, floor_kg: float | None) -> float | None:
        excess = None if floor_kg is None else threshold_kg - floor_kg
        return (threshold_kg - kg) / excess if excess and excess > 1e-9 else None

    rows = {}
    for policy, runs in by_policy.items():
        kgs = [r["emissions_kg"] for r in runs]
        bound = runs[0].get("emissions_bound_windows_only_kg")
        mean_kg = statistics.fmean(kgs)
        rows[policy] = {
            "runs": len(runs), "emissions_kg": mean_kg, "emissions_kg_sd": statistics.pstdev(kgs),
            "windows_only_bound_kg": bound,
            "capture": share_removed(mean_kg, bound),
            "capture_of_oracle_run": share_removed(mean_kg, oracle_kg),
            "over_bound": mean_kg / bound if bound else None,
            "kg_per_1b_tokens": statistics.fmean(r["emissions_kg_per_1b_tokens"] or 0.0 for r in runs),
            "share_energy_in_windows": statistics.fmean(r["share_energy_in_windows"] for r in runs),
            "goodput": statistics.fmean(r["goodput"] or 0.0 for r in runs),
            "completed": all(r["completed"] for r in runs),
        }
    return rows


def evaluate_period(dataset: Dataset, period: Period, *, seeds: int, budget_fraction: float,
                    budget_price: float | None = None) -> dict[str, Any]:
    budget = period_budget(dataset, period, budget_fraction)
    summaries = _summaries(dataset, dataset.experiment(_policies(dataset, seeds, budget_price), period, budget))
    return {"period": period, "token_budget": budget, "policies": _aggregate(summaries)}


def tune_budget_price(dataset: Dataset, *, seeds: int, budget_fraction: float,
                      prices: Sequence[float] = TUNED_PRICES_G_PER_KWH) -> float | None:
    """The budget policy's price with the least mean emissions over the tune periods (None: none)."""
    if not dataset.tune:
        return None
    totals = {}
    for price in prices:
        kgs = []
        for period in dataset.tune:
            budget = period_budget(dataset, period, budget_fraction)
            runs = {f"budget.{s}": {"kind": "budget", "max_ci_g_per_kwh": price, "forecast_seed": s}
                    for s in range(1 if dataset.recorded_forecasts else seeds)}
            summaries = _summaries(dataset, dataset.experiment(runs, period, budget))
            if not all(s["completed"] for s in summaries.values()):
                kgs = None
                break
            kgs.extend(s["emissions_kg"] for s in summaries.values())
        if kgs:
            totals[price] = statistics.fmean(kgs)
    return min(totals, key=totals.get) if totals else None


def evaluate(datasets: Iterable[str] = tuple(DATASETS), *, seeds: int = 5, budget_fraction: float = 0.5,
             periods: int | None = None) -> dict[str, Any]:
    """The protocol on each dataset: tune the budget price on its tune periods, then every
    policy on each evaluation period (``periods``: only the first so many)."""
    results = {}
    for name in datasets:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}: choose from {sorted(DATASETS)}")
        dataset = DATASETS[name]
        price = tune_budget_price(dataset, seeds=seeds, budget_fraction=budget_fraction)
        evaluated = dataset.evaluate[:periods] if periods else dataset.evaluate
        results[name] = {
            "tuned_budget_price_g_per_kwh": price, "tune_periods": dataset.tune,
            "periods": [evaluate_period(dataset, p, seeds=seeds, budget_fraction=budget_fraction,
                                        budget_price=price) for p in evaluated],
        }
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per dataset, period and policy."""
    lines = [("| dataset | period | policy | emissions kg (± sd) | capture | of oracle run | × windows bound | "
              "in windows | goodput | met |"), "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for name, result in results.items():
        for period in result["periods"]:
            start = period["period"][0][:10] if period["period"][0] else "whole trace"
            for policy, row in period["policies"].items():
                spread = f" ± {row['emissions_kg_sd']:.3f}" if row["runs"] > 1 else ""
                lines.append(
                    f"| {name} | {start} | {policy} | {row['emissions_kg']:.3f}{spread} | {fmt(row['capture'], '.2f')} | "
                    f"{fmt(row['capture_of_oracle_run'], '.2f')} | "
                    f"{fmt(row['over_bound'], '.2f')} | {row['share_energy_in_windows']:.1%} | {row['goodput']:.1%} | "
                    f"{'yes' if row['completed'] else 'no'} |")
    return "\n".join(lines)


__all__ = ["DATASETS", "Dataset", "evaluate", "evaluate_period", "period_budget", "table", "tune_budget_price"]
