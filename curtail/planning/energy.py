"""Energy and emissions accounting: power model × state intervals × carbon intensity.

Emissions are the exact integral of power × carbon intensity over time:
``emissions_kg = power_w · ∫ ci_g_per_kwh dt_s / 3.6e9`` (W·g/kWh·s → kg). Energy *inside
windows* is energy drawn while the site's own signal was below the curtailment threshold.
Provisioned-but-not-training states (provisioning, starting, waiting, syncing) draw idle power.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from curtail.config import SiteConfig
from curtail.planning.policy import SiteState
from curtail.planning.signals import Signal, StepFunction

J_PER_KWH = 3.6e6
WS_G_PER_KWH_TO_KG = 3.6e9  # W · s · g/kWh → kg


@dataclass(frozen=True)
class PowerModel:
    """Constant power of one site: training and provisioned-idle, in watts."""

    training_w: float
    idle_w: float

    @classmethod
    def of_site(cls, site: SiteConfig) -> PowerModel:
        return cls(site.site_training_power_w, site.site_idle_power_w)

    def power_w(self, state: SiteState) -> float:
        if state is SiteState.TRAINING:
            return self.training_w
        return self.idle_w if state.provisioned else 0.0


@dataclass(frozen=True)
class Interval:
    """A site spent ``[start_s, end_s)`` in ``state``."""

    site: str
    state: SiteState
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class SiteAccount:
    energy_kwh: float
    emissions_kg: float
    energy_in_windows_kwh: float
    training_s: float
    provisioned_idle_s: float
    training_in_windows_s: float
    curtailed_s: float  # seconds the site's signal was below the threshold in the run span


def account_site(
    intervals: Iterable[Interval],
    power: PowerModel,
    signal: Signal,
    curtailed: StepFunction,
    span: tuple[float, float],
) -> SiteAccount:
    """Integrate one site's intervals against its signal (vectorised)."""
    rows = [(i.start_s, i.end_s, i.state) for i in intervals if i.end_s > i.start_s and i.state.provisioned]
    curtailed_s = float(curtailed.integral(*span))
    if not rows:
        return SiteAccount(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, curtailed_s)
    starts = np.array([r[0] for r in rows])
    ends = np.array([r[1] for r in rows])
    power_w = np.array([power.power_w(r[2]) for r in rows])
    training = np.array([r[2] is SiteState.TRAINING for r in rows])
    duration_s = ends - starts
    ci_seconds = signal.step.integral(starts, ends)
    in_window_s = curtailed.integral(starts, ends)
    return SiteAccount(
        energy_kwh=float(np.sum(power_w * duration_s)) / J_PER_KWH,
        emissions_kg=float(np.sum(power_w * ci_seconds)) / WS_G_PER_KWH_TO_KG,
        energy_in_windows_kwh=float(np.sum(power_w * in_window_s)) / J_PER_KWH,
        training_s=float(np.sum(duration_s[training])),
        provisioned_idle_s=float(np.sum(duration_s[~training])),
        training_in_windows_s=float(np.sum(in_window_s[training])),
        curtailed_s=curtailed_s,
    )


def cumulative_seconds(intervals: Iterable[Interval], query_s: np.ndarray) -> np.ndarray:
    """Seconds spent in the given (non-overlapping) intervals up to each query instant."""
    ordered = sorted((i.start_s, i.end_s) for i in intervals if i.end_s > i.start_s)
    if not ordered:
        return np.zeros_like(query_s, dtype=float)
    starts = np.array([a for a, _ in ordered])
    ends = np.array([b for _, b in ordered])
    before = np.concatenate(([0.0], np.cumsum(ends - starts)[:-1]))
    knots_t = np.column_stack((starts, ends)).ravel()
    knots_v = np.column_stack((before, before + (ends - starts))).ravel()
    return np.interp(query_s, knots_t, knots_v, left=0.0, right=knots_v[-1])


def totals(accounts: Mapping[str, SiteAccount]) -> dict[str, float]:
    energy = sum(a.energy_kwh for a in accounts.values())
    curtailed = sum(a.curtailed_s for a in accounts.values())
    return {
        "energy_kwh": energy,
        "emissions_kg": sum(a.emissions_kg for a in accounts.values()),
        "share_energy_in_windows": (sum(a.energy_in_windows_kwh for a in accounts.values()) / energy)
        if energy > 0
        else 0.0,
        "window_utilisation": (sum(a.training_in_windows_s for a in accounts.values()) / curtailed)
        if curtailed > 0
        else 0.0,
    }
