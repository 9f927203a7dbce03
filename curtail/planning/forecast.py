"""Honest forecasts: what a policy may know about a site's future carbon intensity.

A forecast-aware policy sees only what a forecast would have told it at decision time. Where a
trace has recorded forecasts (the CAISO month has WattTime's, issued every 5 min, 65 min
ahead), policies read those. Where it has none (the paper trace), :func:`synthesize_forecast`
makes WattTime-like forecasts from the signal with a :class:`ForecastErrorModel` calibrated on
the recorded ones (:func:`calibrate_error_model`): seeded, causal in everything except the
truth it perturbs, with errors growing with lead time. Perfect foresight is not a forecast; it
is the oracle (:mod:`curtail.planning.oracle`).

What the recorded WattTime CAISO forecasts show (June 2023, threshold 100 gCO2/kWh), and what
the model reproduces per lead time ``L``:

* they lean on persistence: an **opening window is missed** 90 % (5 min ahead) to 98 %
  (65 min) of the time; a running window is mis-forecast as over 21 → 31 % of the time; a
  window that is not there is almost never invented (< 0.5 %). So the chance of the wrong
  side is conditioned on the side the site was on when the forecast was issued;
* when they get the side right, the level error has a small bias and a spread growing with
  ``L`` (below 100: +13 → +21 g bias, 12 → 17 g spread; above: -9 → -25 g, 43 → 65 g);
* a missed window is forecast part-way towards the level the site was last seen at on the
  other side;
* errors are strongly correlated between successive forecasts of the same instant (0.97) and
  between neighbouring lead times.

Each quantity is a power law of the lead time, ``at_1h * (L / 1 h) ** exponent``, fitted on the
recorded 5–65 min leads. Beyond 65 min the flip rates are held at their 65-min values and the
spreads follow their power laws: a longer ``horizon_s`` is a what-if, not a measurement.

A synthetic forecast's noise is drawn from the run's seed and the site's *name*
(:func:`noise_seed`), so a site's forecasts do not change when other sites are added, removed
or reordered. :func:`foresight` measures forecasts (recorded or synthetic) where decisions
are made: of the windows that open at a level, how many the forecast issued ``L`` before saw.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Protocol

import numpy as np

from curtail.planning.signals import Signal
from curtail.planning.traces import Forecast

_HOUR_S = 3600.0

RECORDED_HORIZON_S = 3900.0
"""The recorded WattTime forecasts reach 65 min ahead (13 five-minute targets)."""


@dataclass(frozen=True)
class PowerLaw:
    """``at_1h * (lead_s / 3600) ** exponent`` (a signed ``at_1h`` keeps a bias's sign)."""

    at_1h: float
    exponent: float

    def __call__(self, lead_s: np.ndarray | float) -> np.ndarray:
        return self.at_1h * (np.asarray(lead_s, dtype=float) / _HOUR_S) ** self.exponent

    @classmethod
    def fit(cls, lead_s: np.ndarray, values: np.ndarray) -> PowerLaw:
        """Least squares in log-log space on ``|values|``, sign of their mean."""
        lead_s, values = np.asarray(lead_s, float), np.asarray(values, float)
        keep = np.abs(values) > 0
        if keep.sum() < 2:
            return cls(float(np.mean(values)) if len(values) else 0.0, 0.0)
        slope, intercept = np.polyfit(
            np.log(lead_s[keep] / _HOUR_S), np.log(np.abs(values[keep])), 1
        )
        sign = 1.0 if np.mean(values[keep]) >= 0 else -1.0
        return cls(sign * float(np.exp(intercept)), float(slope))


@dataclass(frozen=True)
class RegimeErrors:
    """Forecast errors for targets whose actual value is on one side of the threshold.

    The chance that the forecast lands on the wrong side depends above all on whether the
    target is on the same side as the site *was when the forecast was issued*: WattTime's
    forecasts lean on persistence, so they rarely foresee a change (an opening window is
    missed ~95 % of the time) and sometimes foresee one that does not come.
    """

    flip_same: PowerLaw  # P(wrong side | the site was on the target's side at issue)
    flip_changed: PowerLaw  # P(wrong side | the site was on the other side at issue)
    bias_g_per_kwh: PowerLaw  # mean error when the side is right
    spread_g_per_kwh: PowerLaw  # standard deviation of that error
    flipped_depth: (
        float  # a flipped forecast sits this far from the threshold towards the other level (0-1)
    )


@dataclass(frozen=True)
class ForecastErrorModel:
    """How far a WattTime-style forecast is from the truth, by lead time (see module doc).

    ``below`` describes targets that were curtailed (actual below the threshold), ``above``
    the others. ``other_level_ratio_*`` place the other regime's level (as a multiple of the
    threshold) when a site has not yet been seen there. ``rho_revision`` correlates the errors
    of successive forecasts of the same instant, ``rho_lead`` those of neighbouring leads.
    """

    threshold_g_per_kwh: float
    below: RegimeErrors
    above: RegimeErrors
    other_level_ratio_below: float  # typical curtailed level / threshold
    other_level_ratio_above: float  # typical uncurtailed level / threshold
    rho_revision: float
    rho_lead: float
    calibrated_leads_s: tuple[float, float]
    source: str = ""

    def flip_probability(self, lead_s: np.ndarray, below: bool, changed: bool) -> np.ndarray:
        """P(wrong side) for targets below (or above) the threshold, with the site on the other
        side at issue (``changed``) or not. Held at the longest calibrated lead beyond it."""
        regime = self.below if below else self.above
        law = regime.flip_changed if changed else regime.flip_same
        lead_s = np.clip(lead_s, self.calibrated_leads_s[0], self.calibrated_leads_s[1])
        return np.clip(law(lead_s), 0.0, 1.0)

    def scaled(self, factor: float) -> ForecastErrorModel:
        """The same model with every error (flips, bias, spread) scaled by ``factor`` (0 = perfect)."""

        def law(p: PowerLaw) -> PowerLaw:
            return PowerLaw(p.at_1h * factor, p.exponent)

        def scale(regime: RegimeErrors) -> RegimeErrors:
            return RegimeErrors(
                law(regime.flip_same),
                law(regime.flip_changed),
                law(regime.bias_g_per_kwh),
                law(regime.spread_g_per_kwh),
                regime.flipped_depth,
            )

        return replace(self, below=scale(self.below), above=scale(self.above))


WATTTIME_CAISO_2023_06 = ForecastErrorModel(
    threshold_g_per_kwh=100.0,
    below=RegimeErrors(
        flip_same=PowerLaw(at_1h=0.304, exponent=0.1735),
        flip_changed=PowerLaw(at_1h=0.9793, exponent=0.0361),
        bias_g_per_kwh=PowerLaw(at_1h=20.74, exponent=0.1771),
        spread_g_per_kwh=PowerLaw(at_1h=15.33, exponent=0.12),
        flipped_depth=0.422,
    ),
    above=RegimeErrors(
        flip_same=PowerLaw(at_1h=0.0006971, exponent=-0.7666),
        flip_changed=PowerLaw(at_1h=0.1437, exponent=-0.3897),
        bias_g_per_kwh=PowerLaw(at_1h=-24.59, exponent=0.462),
        spread_g_per_kwh=PowerLaw(at_1h=64.02, exponent=0.1844),
        flipped_depth=0.3147,
    ),
    other_level_ratio_below=0.4354,
    other_level_ratio_above=4.237,
    rho_revision=0.9734,
    rho_lead=0.7708,
    calibrated_leads_s=(300.0, 3900.0),
    source="WattTime MOER forecasts, CAISO_NORTH, 2023-06-08 .. 2023-07-08 (data/traces)",
)
"""The model calibrated on the recorded CAISO month (``tests/test_forecast.py`` re-derives it)."""


def calibrate_error_model(
    actual: Signal,
    forecast: Forecast,
    *,
    threshold_g_per_kwh: float = 100.0,
    max_lead_s: float = RECORDED_HORIZON_S,
) -> ForecastErrorModel:
    """Fit a :class:`ForecastErrorModel` to recorded forecasts of ``actual``.

    Every (request, target) pair with a target inside the actual trace and a lead in
    ``(0, max_lead_s]`` counts once; leads are the recorded ones (multiples of 5 min).
    """
    counts = np.diff(forecast.offsets)
    request_s = np.repeat(forecast.request_s, counts)
    lead_s = forecast.target_s - request_s
    inside = (forecast.target_s >= actual.start_s) & (forecast.target_s < actual.end_s)
    known = inside & (lead_s > 0) & (lead_s <= max_lead_s + 1e-6)
    # only targets that fall on a sample instant (the recorded ones all do)
    index = np.clip(
        np.searchsorted(actual.times_s, forecast.target_s, side="left"), 0, len(actual.times_s) - 1
    )
    known &= np.isclose(actual.times_s[index], forecast.target_s)
    truth = actual.ci_g_per_kwh[index]
    predicted = forecast.ci_g_per_kwh
    threshold = threshold_g_per_kwh
    leads = np.unique(np.round(lead_s[known]))

    issued = np.clip(
        np.searchsorted(actual.times_s, request_s, side="right") - 1, 0, len(actual.times_s) - 1
    )
    below_at_issue = actual.ci_g_per_kwh[issued] < threshold

    def regime(below: bool) -> RegimeErrors:
        flips_same, flips_changed, biases, spreads, depth_samples = [], [], [], [], []
        side = truth < threshold if below else truth >= threshold
        same = below_at_issue == below
        other_level = (
            np.median(actual.ci_g_per_kwh[actual.ci_g_per_kwh >= threshold])
            if below
            else np.median(actual.ci_g_per_kwh[actual.ci_g_per_kwh < threshold])
        )
        for lead in leads:
            rows = known & side & (np.abs(lead_s - lead) < 1)
            flipped = (predicted[rows] >= threshold) if below else (predicted[rows] < threshold)
            error = predicted[rows] - truth[rows]
            flips_same.append(flipped[same[rows]].mean() if same[rows].any() else 0.0)
            flips_changed.append(flipped[~same[rows]].mean() if (~same[rows]).any() else 0.0)
            biases.append(error[~flipped].mean() if (~flipped).any() else 0.0)
            spreads.append(error[~flipped].std(ddof=1) if (~flipped).sum() > 1 else 0.0)
            depth_samples.append((predicted[rows][flipped] - threshold) / (other_level - threshold))
        depths = np.concatenate(depth_samples) if depth_samples else np.array([0.5])
        return RegimeErrors(
            PowerLaw.fit(leads, np.array(flips_same)),
            PowerLaw.fit(leads, np.array(flips_changed)),
            PowerLaw.fit(leads, np.array(biases)),
            PowerLaw.fit(leads, np.array(spreads)),
            float(np.clip(np.median(depths), 0.0, 1.0)) if len(depths) else 0.5,
        )

    below_values = actual.ci_g_per_kwh[actual.ci_g_per_kwh < threshold]
    above_values = actual.ci_g_per_kwh[actual.ci_g_per_kwh >= threshold]
    error = np.where(known, predicted - truth, np.nan)
    return ForecastErrorModel(
        threshold_g_per_kwh=threshold,
        below=regime(True),
        above=regime(False),
        other_level_ratio_below=float(np.median(below_values) / threshold)
        if len(below_values)
        else 0.5,
        other_level_ratio_above=float(np.median(above_values) / threshold)
        if len(above_values)
        else 4.0,
        rho_revision=_revision_correlation(forecast, request_s, error),
        rho_lead=_lead_correlation(forecast, lead_s, error),
        calibrated_leads_s=(float(leads.min()), float(leads.max())),
        source=forecast.source,
    )


def _revision_correlation(forecast: Forecast, request_s: np.ndarray, error: np.ndarray) -> float:
    """Correlation of the errors of two successive forecasts of the same target instant."""
    ok = np.isfinite(error)
    order = np.lexsort((request_s[ok], forecast.target_s[ok]))
    target, request, err = forecast.target_s[ok][order], request_s[ok][order], error[ok][order]
    step = float(np.median(np.diff(forecast.request_s)))
    pair = (target[1:] == target[:-1]) & np.isclose(request[1:] - request[:-1], step)
    return float(np.corrcoef(err[:-1][pair], err[1:][pair])[0, 1]) if pair.sum() > 2 else 0.0


def _lead_correlation(forecast: Forecast, lead_s: np.ndarray, error: np.ndarray) -> float:
    """Correlation of the errors at neighbouring lead times within one forecast."""
    same_request = np.diff(forecast.offsets)
    first = np.zeros(len(error), dtype=bool)
    first[forecast.offsets[:-1][same_request > 0]] = True
    pair = ~first[1:] & np.isfinite(error[1:]) & np.isfinite(error[:-1])
    return float(np.corrcoef(error[:-1][pair], error[1:][pair])[0, 1]) if pair.sum() > 2 else 0.0


def _last_value_where(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """For each index, the latest ``values[j]`` with ``j <= index`` and ``mask[j]`` (NaN if none)."""
    index = np.where(mask, np.arange(len(values)), -1)
    index = np.maximum.accumulate(index)
    return np.where(index >= 0, values[np.maximum(index, 0)], np.nan)


def noise_seed(seed: int, site: str) -> list[int]:
    """The entropy of ``site``'s synthetic forecast noise: the run's ``seed`` and a stable hash
    of the site's name (CRC-32 of its UTF-8 bytes; unlike ``hash()``, the same in every
    process), never its position among the sites.

    >>> noise_seed(0, "caiso_north")
    [0, 3567636198]
    """
    return [seed % 2**64, zlib.crc32(site.encode("utf-8"))]


def synthesize_forecast(
    signal: Signal,
    *,
    model: ForecastErrorModel = WATTTIME_CAISO_2023_06,
    thresholds: np.ndarray | float | None = None,
    seed: int = 0,
    site: str | None = None,
    horizon_s: float = RECORDED_HORIZON_S,
    issue_every_s: float | None = None,
) -> Forecast:
    """WattTime-like forecasts of ``signal``: the truth perturbed by ``model``'s errors.

    A forecast is issued at every sample instant (or every ``issue_every_s``) for the sample
    instants up to ``horizon_s`` ahead. The regime boundary is the site's curtailment threshold
    (``thresholds``: one per sample, or a number; default the model's), read at the issue time.
    A forecast that misses a regime places the target part-way towards the level the site was
    last *seen* at in the other regime (causal), or ``other_level_ratio_*`` times the threshold
    if it has not been seen there yet. Deterministic for a given ``seed`` and ``site``: the
    noise comes from :func:`noise_seed` (``seed`` and the site's name) when ``site`` is given,
    from ``seed`` alone otherwise.
    """
    step_s = float(signal.resolution_s)
    num_leads = math.floor(horizon_s / step_s + 1e-9)
    if num_leads < 1:
        raise ValueError(f"horizon_s ({horizon_s}) is shorter than one sample ({step_s} s)")
    issue_every_s = issue_every_s or step_s
    request_s = np.arange(signal.start_s, signal.end_s - step_s / 2, issue_every_s)
    leads_s = step_s * np.arange(1, num_leads + 1)
    targets_s = request_s[:, None] + leads_s[None, :]
    truth = np.asarray(signal.step.value_at(targets_s), dtype=float)

    sample_of_request = np.clip(
        np.searchsorted(signal.times_s, request_s, side="right") - 1, 0, None
    )
    if thresholds is None:
        per_sample = np.full(len(signal.times_s), model.threshold_g_per_kwh)
    else:
        per_sample = np.broadcast_to(np.asarray(thresholds, dtype=float), signal.times_s.shape)
    threshold = per_sample[sample_of_request][:, None]
    below = truth < threshold

    values = signal.ci_g_per_kwh
    seen_below = _last_value_where(values, values < per_sample)[sample_of_request][:, None]
    seen_above = _last_value_where(values, values >= per_sample)[sample_of_request][:, None]
    level_below = np.where(
        np.isnan(seen_below), threshold * model.other_level_ratio_below, seen_below
    )
    level_above = np.where(
        np.isnan(seen_above), threshold * model.other_level_ratio_above, seen_above
    )

    rng = np.random.default_rng(seed if site is None else noise_seed(seed, site))
    flip_latent = _latent_field(rng, len(request_s), num_leads, model.rho_revision, model.rho_lead)
    level_latent = _latent_field(rng, len(request_s), num_leads, model.rho_revision, model.rho_lead)
    normal = NormalDist()

    def cut(below_target: bool, changed: bool) -> np.ndarray:
        probabilities = model.flip_probability(leads_s, below_target, changed)
        return np.array([normal.inv_cdf(min(max(p, 1e-12), 1 - 1e-12)) for p in probabilities])

    below_at_issue = values[sample_of_request][:, None] < threshold
    changed = below != below_at_issue
    flip_cut = np.where(
        below,
        np.where(changed, cut(True, True), cut(True, False)),
        np.where(changed, cut(False, True), cut(False, False)),
    )
    flipped = flip_latent < flip_cut

    bias = np.where(below, model.below.bias_g_per_kwh(leads_s), model.above.bias_g_per_kwh(leads_s))
    spread = np.where(
        below, model.below.spread_g_per_kwh(leads_s), model.above.spread_g_per_kwh(leads_s)
    )
    level = truth + bias + spread * level_latent
    just_below = np.nextafter(threshold, -np.inf)
    right_side = np.where(below, np.minimum(level, just_below), np.maximum(level, threshold))
    missed = threshold + model.below.flipped_depth * np.maximum(level_above - threshold, 0.0)
    invented = threshold - model.above.flipped_depth * np.maximum(threshold - level_below, 0.0)
    invented = np.minimum(invented, just_below)
    wrong_side = np.where(below, missed, invented)
    forecast = np.maximum(np.where(flipped, wrong_side, right_side), 0.0)

    inside = targets_s < signal.end_s
    counts = inside.sum(axis=1)
    keep = counts > 0
    offsets = np.concatenate(([0], np.cumsum(counts[keep])))
    return Forecast(
        region=signal.region,
        request_s=request_s[keep],
        offsets=offsets,
        target_s=targets_s[inside],
        ci_g_per_kwh=forecast[inside],
        source=f"synthetic({model.source or 'error model'}; seed={seed}"
        + (f", site={site}" if site is not None else "")
        + f", horizon_s={horizon_s:g})",
    )


def _latent_field(
    rng: np.random.Generator,
    num_requests: int,
    num_leads: int,
    rho_revision: float,
    rho_lead: float,
) -> np.ndarray:
    """Unit-variance Gaussian field ``z[request, lead]``, correlated along leads and revisions.

    ``z[i, k] = rho_revision * z[i-1, k+1] + sqrt(1 - rho_revision²) * eta[i, k]``: the forecast
    of one target instant evolves slowly as it is re-issued; ``eta`` is AR(1) over leads.
    """
    eta = rng.standard_normal((num_requests, num_leads))
    c_lead = math.sqrt(max(1.0 - rho_lead**2, 0.0))
    for k in range(1, num_leads):
        eta[:, k] = rho_lead * eta[:, k - 1] + c_lead * eta[:, k]
    z = np.empty_like(eta)
    z[:, -1] = eta[:, -1]
    c_rev = math.sqrt(max(1.0 - rho_revision**2, 0.0))
    for k in range(num_leads - 2, -1, -1):
        previous = np.concatenate(([rng.standard_normal()], z[:-1, k + 1]))
        z[:, k] = rho_revision * previous + c_rev * eta[:, k]
    return z


@dataclass(frozen=True)
class Foresight:
    """What forecasts issued ``lead_s`` ahead said about the crossings of one level.

    An *opening* is a sample below ``threshold_g_per_kwh`` after one at or above it; a
    *closing* the reverse. An opening is *new* when the site was at or above the level for the
    whole ``lead_s`` before it (persistence says "no window"), a *reopening* otherwise. A
    closing counts only when the site was below the level for the whole ``lead_s`` before it
    (persistence says "still open"; the end of a shorter window was no window at issue). A
    crossing at ``T`` counts only where a forecast was issued at ``T - lead_s`` (within one
    sample); it is *foreseen* when that forecast puts some target in ``[T - tolerance_s,
    T + tolerance_s]`` on the new side. ``false_alarm_rate``: of the targets ``lead_s`` ahead
    that are at or above the level, with the site at or above it at issue, the share forecast
    below it (an invented window); ``open_miss_rate``: of the targets ``lead_s`` ahead below the
    level, with the site below it at issue, the share forecast at or above it (an open window
    called closed — what makes "foreseen" closings cheap).
    """

    threshold_g_per_kwh: float
    lead_s: float
    new_openings: int
    new_openings_foreseen: int
    reopenings: int
    reopenings_foreseen: int
    closings: int
    closings_foreseen: int
    false_alarm_rate: float
    open_miss_rate: float


def foresight(
    actual: Signal,
    forecast: Forecast,
    *,
    threshold_g_per_kwh: float,
    lead_s: float,
    tolerance_s: float = 0.0,
) -> Foresight:
    """Count how many openings and closings of ``actual`` at ``threshold_g_per_kwh`` the
    forecasts issued ``lead_s`` before them foresaw (see :class:`Foresight`).

    Example: ``foresight(signal, recorded, threshold_g_per_kwh=100, lead_s=3600)``.
    """
    times, values = actual.times_s, actual.ci_g_per_kwh
    step_s = float(actual.resolution_s)
    below = values < threshold_g_per_kwh
    crossings = np.flatnonzero(below[1:] != below[:-1]) + 1
    counts = {"new": [0, 0], "reopen": [0, 0], "close": [0, 0]}
    for index in crossings:
        crossing_s = float(times[index])
        issued = int(np.searchsorted(forecast.request_s, crossing_s - lead_s + 1e-6, side="right")) - 1
        if issued < 0 or forecast.request_s[issued] < crossing_s - lead_s - step_s + 1e-6:
            continue  # no forecast issued lead_s before this crossing
        if crossing_s - lead_s < times[0]:
            continue  # the site's side over the lead is unknown
        rows = slice(forecast.offsets[issued], forecast.offsets[issued + 1])
        targets, predicted = forecast.target_s[rows], forecast.ci_g_per_kwh[rows]
        near = np.abs(targets - crossing_s) <= tolerance_s + 1e-6
        if not near.any():
            continue  # the forecast does not reach the crossing
        since = int(np.searchsorted(times, crossing_s - lead_s - 1e-6, side="left"))
        if below[index]:
            kind = "reopen" if below[since:index].any() else "new"
            seen = bool(np.any(predicted[near] < threshold_g_per_kwh))
        elif below[since:index].all():
            kind = "close"
            seen = bool(np.any(predicted[near] >= threshold_g_per_kwh))
        else:
            continue  # a window shorter than the lead: not open at issue
        counts[kind][0] += 1
        counts[kind][1] += seen

    request_of_row = np.repeat(forecast.request_s, np.diff(forecast.offsets))
    at_lead = np.abs(forecast.target_s - request_of_row - lead_s) < 1e-6
    at_lead &= (forecast.target_s < actual.end_s) & (request_of_row >= actual.start_s)
    truth = np.asarray(actual.step.value_at(forecast.target_s[at_lead]), dtype=float)
    at_issue = np.asarray(actual.step.value_at(request_of_row[at_lead]), dtype=float)
    predicted = forecast.ci_g_per_kwh[at_lead]
    calm = (truth >= threshold_g_per_kwh) & (at_issue >= threshold_g_per_kwh)
    invented = predicted[calm] < threshold_g_per_kwh
    held = (truth < threshold_g_per_kwh) & (at_issue < threshold_g_per_kwh)
    missed = predicted[held] >= threshold_g_per_kwh
    return Foresight(
        threshold_g_per_kwh,
        lead_s,
        *counts["new"],
        *counts["reopen"],
        *counts["close"],
        float(invented.mean()) if len(invented) else math.nan,
        float(missed.mean()) if len(missed) else math.nan,
    )


@dataclass(frozen=True)
class Outlook:
    """A site's future as a policy may see it at ``now_s``: the forecast targets after now."""

    now_s: float
    targets_s: np.ndarray
    ci_g_per_kwh: np.ndarray
    step_s: float

    @property
    def horizon_end_s(self) -> float:
        return float(self.targets_s[-1] + self.step_s) if len(self.targets_s) else self.now_s

    def runs_below(self, level: float) -> list[tuple[float, float]]:
        """Maximal stretches ``[start, end)`` the forecast puts below ``level``; a stretch that
        reaches the horizon ends at ``inf`` (its end is unknown)."""
        below = self.ci_g_per_kwh < level
        if not below.any():
            return []
        edges = np.diff(np.concatenate(([False], below, [False])).astype(np.int8))
        firsts, afters = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs = []
        for first, after in zip(firsts, afters):
            end = math.inf if after == len(below) else float(self.targets_s[after])
            runs.append((float(self.targets_s[first]), end))
        return runs

    def first_at_or_above(self, level: float) -> float:
        """When the forecast first puts the site at or above ``level`` (``inf`` if never)."""
        above = np.flatnonzero(self.ci_g_per_kwh >= level)
        return float(self.targets_s[above[0]]) if len(above) else math.inf


class IssuedForecasts(Protocol):
    """What a policy reads of a site's forecasts: the newest issued by ``now_s`` (targets,
    values), or None. A recorded :class:`~curtail.planning.traces.Forecast` is one; a live run's
    (:class:`curtail.sources.live_forecasts.LiveForecast`) also says when the next arrives."""

    def latest(self, now_s: float) -> tuple[np.ndarray, np.ndarray] | None: ...


class ArrivingForecasts(IssuedForecasts, Protocol):
    """A live run's forecasts: they arrive as the run's clock passes ``next_due_s``."""

    def next_due_s(self, now_s: float) -> float: ...


def outlook_of(forecast: IssuedForecasts | None, now_s: float, step_s: float) -> Outlook | None:
    """The newest forecast issued at or before ``now_s``, restricted to targets after now."""
    if forecast is None:
        return None
    latest = forecast.latest(now_s)
    if latest is None:
        return None
    targets, values = latest
    after = targets > now_s + 1e-6
    return Outlook(now_s, targets[after], values[after], step_s)
