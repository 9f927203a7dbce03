"""Provisioning as measured: the idle energy and emissions of a real run's site start-ups.

The simulator and a run's accounting charge each site window the model's start-up
(``provisioning_s + group_start_s``) at the site's idle power. A real run also records, per
window, when it asked for the site's capacity and when the site's worker group first answered
(``site_capacity.csv``, one row per window). :func:`measured_provisioning` charges those measured
seconds instead, beside the model's, at the grid's carbon intensity when the request was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from curtail.errors import CurtailError

if TYPE_CHECKING:
    from curtail.planning.plan import RunPlan

CAPACITY_FILE = "site_capacity.csv"
"""One row per site window: when capacity was requested, nodes were up, the group answered, released."""

REQUIRED_COLUMNS = ("site", "requested_t_s", "requested_wall_s", "group_ready_wall_s", "released_wall_s")
"""The ``site_capacity.csv`` columns the accounting reads."""

IntensityAt = Callable[[str, float], float]
"""``intensity(site, t_s)``: the site's carbon intensity (gCO2/kWh) at run time ``t_s`` (epoch s)."""


def intensity_of(plan: RunPlan) -> IntensityAt:
    """The run's carbon intensity per site: its policy context's signals, keyed by site name
    (a recorded or simulated run's traces; a live run's readings as received)."""
    signals = plan.context.signals

    def intensity(site: str, t_s: float) -> float:
        if site not in signals:
            raise CurtailError(
                f"site {site!r} is not in run {plan.run.name!r} (its sites: {sorted(signals)}); "
                "account the run's site_capacity.csv against the plan of that run"
            )
        return signals[site].value_at(t_s)

    return intensity


_SUMMED = ("num_windows", "num_never_ready", "measured_s", "modelled_s",
           "measured_kwh", "modelled_kwh", "measured_kg", "modelled_kg")


def _figures(sums: Mapping[str, float]) -> dict[str, float]:
    """Summed window figures, the counts as ints, and measured minus modelled per unit."""
    figures: dict[str, float] = {key: float(sums[key]) for key in _SUMMED}
    figures["num_windows"], figures["num_never_ready"] = int(sums["num_windows"]), int(sums["num_never_ready"])
    for unit in ("s", "kwh", "kg"):
        figures[f"difference_{unit}"] = figures[f"measured_{unit}"] - figures[f"modelled_{unit}"]
    return figures


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def measured_provisioning(
    windows: pd.DataFrame,
    *,
    modelled_start_s: float,
    idle_power_w: Mapping[str, float],
    intensity_g_per_kwh: IntensityAt,
) -> dict[str, Any]:
    """Provisioned-idle seconds, kWh and kg CO2 per site and in total, measured and modelled.

    A window's measured seconds run from its request to its worker group's first answer
    (``group_ready_wall_s - requested_wall_s``); a group that never answered counts to the
    window's release and is counted in ``num_never_ready``. Each window is modelled as
    ``modelled_start_s``. Energy is ``idle_power_w[site] * s / 3.6e6`` kWh; emissions that
    times ``intensity_g_per_kwh(site, requested_t_s) / 1000`` kg. ``difference_*`` is measured
    minus modelled. Every site of ``idle_power_w`` is reported, with zeros if it had no window.

    >>> frame = pd.read_csv(run_dir / "site_capacity.csv")
    >>> measured_provisioning(frame, modelled_start_s=270.0, idle_power_w={"a": 468.0},
    ...                       intensity_g_per_kwh=intensity_of(plan))["total"]["difference_kwh"]
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in windows.columns]
    if missing and len(windows):
        raise CurtailError(
            f"the site windows have no column {', '.join(missing)} (they have {list(windows.columns)}); "
            "give the run directory's site_capacity.csv as written by SiteCapacity.write"
        )
    counted: list[tuple[Any, ...]] = []
    for row, window in enumerate(windows.itertuples(index=False), start=1):
        site = str(window.site)
        if site not in idle_power_w:
            raise CurtailError(
                f"site window {row} is of site {site!r}, which has no idle power (sites: {sorted(idle_power_w)}); "
                "give idle_power_w for every site of the run"
            )
        never_ready = not _present(window.group_ready_wall_s)
        end_wall_s = window.released_wall_s if never_ready else window.group_ready_wall_s
        if not _present(end_wall_s):
            raise CurtailError(
                f"site window {row} ({site!r}) was never ready nor released; "
                "account site_capacity.csv only after the run released its sites (SiteCapacity.release_all)"
            )
        measured_s = float(end_wall_s) - float(window.requested_wall_s)
        kg_per_kwh = intensity_g_per_kwh(site, float(window.requested_t_s)) / 1000.0
        measured_kwh = idle_power_w[site] * measured_s / 3.6e6
        modelled_kwh = idle_power_w[site] * modelled_start_s / 3.6e6
        counted.append((site, 1, int(never_ready), measured_s, modelled_start_s, measured_kwh, modelled_kwh,
                        measured_kwh * kg_per_kwh, modelled_kwh * kg_per_kwh))
    per_window = pd.DataFrame(counted, columns=["site", *_SUMMED])
    by_site = per_window.groupby("site")[list(_SUMMED)].sum().reindex(list(idle_power_w), fill_value=0)
    return {
        "modelled_start_s": modelled_start_s,
        "by_site": {site: _figures(sums) for site, sums in by_site.iterrows()},
        "total": _figures(per_window[list(_SUMMED)].sum()),
    }


def measured_provisioning_of(plan: RunPlan, windows: pd.DataFrame) -> dict[str, Any]:
    """:func:`measured_provisioning` with the plan's start-up model, idle powers and signals."""
    return measured_provisioning(
        windows,
        modelled_start_s=plan.context.rules.provisioning_s + plan.context.execution.group_start_s,
        idle_power_w={site: power.idle_w for site, power in plan.power.items()},
        intensity_g_per_kwh=intensity_of(plan),
    )


__all__ = ["REQUIRED_COLUMNS", "IntensityAt", "intensity_of", "measured_provisioning", "measured_provisioning_of"]
