"""Accounting of a trajectory: the ``summary.json`` object and the per-site timeseries.

Both executors hand their :class:`~curtail.planning.trajectory.Trajectory` to
:func:`summarize` and :func:`timeseries` (through :func:`curtail.runlog.record_of`); the
summary's keys are the run directory's ``summary.json`` (:mod:`curtail.runlog`, the README's
"Run directory"): ``run``, ``policy``, ``sites``, ``tokens``, ``hours``, ``energy_kwh``,
``emissions_kg``, ``emissions_kg_per_1b_tokens``, ``share_energy_in_windows``,
``window_utilisation``, ``site_hours``, ``mode_hours``, ``num_syncs``, the curtailment rule
(:func:`threshold_summary`) and, where the executor's plan gives them, the emission bounds
(:meth:`~curtail.planning.oracle.EmissionBounds.summary`), ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from curtail.planning.energy import (
    PowerModel,
    SiteAccount,
    account_site,
    cumulative_seconds,
    totals,
)
from curtail.planning.oracle import EmissionBounds
from curtail.planning.policy import SiteState
from curtail.planning.signals import Signal, iso
from curtail.planning.trajectory import RunMode, Trajectory
from curtail.planning.windows import CurtailmentCalendar

_HOURS = 3600.0


def site_accounts(
    trajectory: Trajectory,
    power: Mapping[str, PowerModel],
    signals: Mapping[str, Signal],
    calendar: CurtailmentCalendar,
) -> dict[str, SiteAccount]:
    span = (trajectory.start_s, trajectory.finish_s)
    return {
        site: account_site(
            trajectory.intervals_of(site), power[site], signals[site], calendar.curtailed(site), span
        )
        for site in trajectory.sites
    }


def summarize(
    trajectory: Trajectory,
    *,
    run: str,
    policy: str,
    regions: Mapping[str, str],
    power: Mapping[str, PowerModel],
    signals: Mapping[str, Signal],
    calendar: CurtailmentCalendar,
    token_budget: float,
    executor: str,
    extra: Mapping[str, Any] | None = None,
    bounds: EmissionBounds | None = None,
) -> dict[str, Any]:
    """The run's ``summary.json`` object (with ``bounds``: the emission bounds' keys too)."""
    accounts = site_accounts(trajectory, power, signals, calendar)
    mode_hours = {mode.value: 0.0 for mode in RunMode}
    for interval in trajectory.modes:
        mode_hours[interval.mode.value] += (interval.end_s - interval.start_s) / _HOURS
    summary: dict[str, Any] = {
        "run": run,
        "policy": policy,
        "executor": executor,
        "sites": list(trajectory.sites),
        "regions": dict(regions),
        "start": iso(trajectory.start_s),
        "finish": iso(trajectory.finish_s),
        "completed": trajectory.completed,
        "token_budget": token_budget,
        "tokens": trajectory.tokens,
        "tokens_by_site": dict(trajectory.tokens_by_site),
        "hours": (trajectory.finish_s - trajectory.start_s) / _HOURS,
        **totals(accounts),
        "site_hours": {
            site: {
                "training": account.training_s / _HOURS,
                "provisioned_idle": account.provisioned_idle_s / _HOURS,
            }
            for site, account in accounts.items()
        },
        "curtailed_hours": {site: a.curtailed_s / _HOURS for site, a in accounts.items()},
        "energy_kwh_by_site": {site: a.energy_kwh for site, a in accounts.items()},
        "emissions_kg_by_site": {site: a.emissions_kg for site, a in accounts.items()},
        "mode_hours": mode_hours,
        "num_syncs": trajectory.num_syncs,
        **threshold_summary(calendar, trajectory.sites, (trajectory.start_s, trajectory.finish_s)),
        "final_eval_loss": None,
    }
    training_s = sum(a.training_s for a in accounts.values())
    provisioned_s = training_s + sum(a.provisioned_idle_s for a in accounts.values())
    # goodput: the share of provisioned site-time spent training (the rest: start-ups, syncs, waits)
    summary["goodput"] = training_s / provisioned_s if provisioned_s > 0 else None
    emissions_kg = summary["emissions_kg"]
    summary["emissions_kg_per_1b_tokens"] = (
        emissions_kg / (trajectory.tokens / 1e9) if trajectory.tokens > 0 else None
    )
    if bounds is not None:
        summary.update(bounds.summary(emissions_kg))
    if extra:
        summary.update(extra)
    return summary


def threshold_summary(
    calendar: CurtailmentCalendar, sites: Sequence[str], span: tuple[float, float]
) -> dict[str, Any]:
    """The curtailment rule as ``summary.json`` reports it.

    ``threshold_kind``; ``threshold_g_per_kwh`` (the absolute level; None for a percentile
    rule, which has no single level); ``threshold_percentile`` and ``percentile_window_s``
    (the percentile rule; None for an absolute one); ``thresholds_g_per_kwh_by_site``: each
    site's thresholds in force during ``span`` (min, median, max over the samples holding then).
    """
    rules = calendar.rules
    percentile = rules.threshold_kind == "percentile"
    by_site = {}
    for site in sites:
        signal, levels = calendar.signals[site], calendar.thresholds(site)
        holding = (np.append(signal.times_s[1:], signal.end_s) > span[0]) & (signal.times_s < span[1])
        if not holding.any():  # an empty span: the sample holding at its start
            first = int(np.searchsorted(signal.times_s, span[0], side="right")) - 1
            holding[min(max(first, 0), len(holding) - 1)] = True
        used = levels[holding]
        by_site[site] = {
            "min": float(used.min()),
            "median": float(np.median(used)),
            "max": float(used.max()),
        }
    return {
        "threshold_kind": rules.threshold_kind,
        "threshold_g_per_kwh": None if percentile else rules.threshold_g_per_kwh,
        "threshold_percentile": rules.threshold_percentile if percentile else None,
        "percentile_window_s": rules.percentile_window_s if percentile else None,
        "thresholds_g_per_kwh_by_site": by_site,
    }


def _state_at(intervals: list, query_s: np.ndarray) -> np.ndarray:
    """The state of one site (non-overlapping, sorted intervals) at each query instant."""
    states = np.full(len(query_s), SiteState.OFF.value, dtype=object)
    if not intervals:
        return states
    starts = np.array([i.start_s for i in intervals])
    ends = np.array([i.end_s for i in intervals])
    labels = np.array([i.state.value for i in intervals], dtype=object)
    index = np.searchsorted(starts, query_s, side="right") - 1
    inside = (index >= 0) & (query_s < ends[np.clip(index, 0, None)])
    states[inside] = labels[index[inside]]
    return states


def timeseries(
    trajectory: Trajectory,
    power: Mapping[str, PowerModel],
    signals: Mapping[str, Signal],
) -> pd.DataFrame:
    """Per-site rows at the trace's resolution: state, power, energy, CI, emissions, tokens, loss."""
    frames = []
    start_s, finish_s = trajectory.start_s, trajectory.finish_s
    mode_starts = np.array([m.start_s for m in trajectory.modes])
    mode_values = np.array([m.mode.value for m in trajectory.modes], dtype=object)
    for site in trajectory.sites:
        signal = signals[site]
        inner = signal.times_s[(signal.times_s > start_s) & (signal.times_s < finish_s)]
        edges = np.concatenate(([start_s], inner, [finish_s]))
        if len(edges) < 2 or finish_s <= start_s:
            continue
        intervals = trajectory.intervals_of(site)
        training = [i for i in intervals if i.state is SiteState.TRAINING]
        idle = [i for i in intervals if i.state.provisioned and i.state is not SiteState.TRAINING]
        training_s = np.diff(cumulative_seconds(training, edges))
        idle_s = np.diff(cumulative_seconds(idle, edges))
        bin_s = np.diff(edges)
        model = power[site]
        energy_kwh = (training_s * model.training_w + idle_s * model.idle_w) / 3.6e6
        ci = signal.step.value_at(edges[:-1])
        rate = trajectory.tokens_by_site[site] / max(sum(i.duration_s for i in training), 1e-9)
        run_mode = np.full(len(bin_s), RunMode.IDLE.value, dtype=object)
        if len(mode_starts):
            mode_index = np.searchsorted(mode_starts, edges[:-1], side="right") - 1
            run_mode[mode_index >= 0] = mode_values[mode_index[mode_index >= 0]]
        frames.append(
            pd.DataFrame(
                {
                    "time": pd.to_datetime(edges[:-1], unit="s", utc=True).as_unit("ns"),
                    "site": site,
                    "state": _state_at(intervals, edges[:-1]),
                    "run_mode": run_mode,
                    "training_s": training_s,
                    "provisioned_idle_s": idle_s,
                    "power_w": (energy_kwh * 3.6e6) / bin_s,
                    "energy_kwh": energy_kwh,
                    "ci_g_per_kwh": ci,
                    "emissions_kg": energy_kwh * ci / 1000.0,
                    "tokens": np.cumsum(training_s) * rate,
                    "loss": np.nan,
                }
            )
        )
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    train_losses = [p for p in trajectory.losses if p.kind == "train" and p.site]
    if train_losses:  # each row carries the site's latest training loss reported by then
        losses = pd.DataFrame(
            {
                "time": pd.to_datetime([p.t_s for p in train_losses], unit="s", utc=True).as_unit("ns"),
                "site": [p.site for p in train_losses],
                "loss": [p.loss for p in train_losses],
            }
        ).sort_values("time")
        frame = pd.merge_asof(
            frame.drop(columns="loss").sort_values("time"), losses, on="time", by="site", direction="backward"
        )
        frame = frame.sort_values(["site", "time"], kind="stable").reset_index(drop=True)
    return frame
