"""How recorded MOER forecasts behave where decisions are made, against the synthetic model.

    .venv/bin/python experiments/forecast_calibration.py               # the table (about a minute)
    .venv/bin/python experiments/forecast_calibration.py --seeds 0 1 2 --tolerance-min 15

For each region with recorded forecasts — the SGIP year 2020 (SGIP_CAISO_PGE, SGIP_CAISO_SCE:
forecasts every 5 min, 3 h ahead) and WattTime's CAISO_NORTH month (June 2023, 65 min ahead, so
1 h only) — and each decision level (50, 75, 100, 150 gCO2/kWh) and lead (1 h, 3 h), it counts
(:func:`curtail.planning.forecast.foresight`):

* new openings (the site was at or above the level for the whole lead before) and reopenings
  (it was below it somewhere in that lead), and how many of each the forecast issued ``lead``
  before put below the level at the opening instant (± ``--tolerance-min``);
* closings of windows open for the whole lead before, and how many the forecast issued
  ``lead`` before put at or above the level;
* the false-alarm rate: targets at or above the level, with the site at or above at issue,
  forecast below it; and the open-miss rate: targets below the level, with the site below at
  issue, forecast at or above it (the price of "foreseen" closings);

once for the recorded forecasts and once for :func:`~curtail.planning.forecast.synthesize_forecast`
(``WATTTIME_CAISO_2023_06``, calibrated on the CAISO month at 100 g; boundary = the level, as a
policy at that threshold would use it; mean over ``--seeds``). Cells read ``recorded /
synthetic``; the numbers are in ``docs/POLICIES.md``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curtail.config import ForecastSource, TraceSource
from curtail.planning.forecast import Foresight, foresight, synthesize_forecast
from curtail.planning.signals import Signal
from curtail.planning.traces import Forecast, load_forecast, load_trace

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"
LEVELS_G_PER_KWH = (50.0, 75.0, 100.0, 150.0)
LEADS_S = (3600.0, 3 * 3600.0)


@dataclass(frozen=True)
class Recorded:
    name: str
    actual: Signal
    forecast: Forecast
    horizon_s: float


def sgip(area: str) -> Recorded:
    region = f"SGIP_CAISO_{area.upper()}"
    actual = load_trace(TraceSource(path=TRACES / f"sgip_moer_2020_caiso-{area}_actual.csv.gz")).signals[region]
    forecast = load_forecast(
        ForecastSource(path=TRACES / f"sgip_moer_2020_caiso-{area}_forecast.csv.gz", region=region)
    )
    return Recorded(f"{region} 2020", actual, forecast, 3 * 3600.0)


def caiso_month() -> Recorded:
    actual = load_trace(
        TraceSource(path=TRACES / "watttime_moer_2023-06_caiso-north_actual.csv", naive_timezone="UTC")
    ).signals["Caiso_North"]
    forecast = load_forecast(
        ForecastSource(
            path=TRACES / "watttime_moer_2023-06_caiso-north_forecast.csv.gz",
            region="Caiso_North",
            naive_timezone="UTC",
        )
    )
    return Recorded("CAISO_NORTH 2023-06", actual, forecast, 3900.0)


def _share(seen: float, count: int) -> str:
    return f"{seen / count:3.0%}" if count else "–"


def rows(data: Recorded, seeds: list[int], tolerance_s: float) -> list[str]:
    lines = []
    for level in LEVELS_G_PER_KWH:
        synthetic = [
            synthesize_forecast(
                data.actual, thresholds=level, seed=seed, site=data.actual.region, horizon_s=data.horizon_s
            )
            for seed in seeds
        ]
        for lead_s in LEADS_S:
            if lead_s > data.horizon_s:
                continue
            measure = {"threshold_g_per_kwh": level, "lead_s": lead_s, "tolerance_s": tolerance_s}
            recorded = foresight(data.actual, data.forecast, **measure)
            made = [foresight(data.actual, forecast, **measure) for forecast in synthetic]

            def cell(count: str, seen: str, rec: Foresight = recorded, made: list[Foresight] = made) -> str:
                n = getattr(rec, count)
                mean_seen = float(np.mean([getattr(m, seen) for m in made]))
                return f"{n:4d} | {_share(getattr(rec, seen), n)} / {_share(mean_seen, n)}"

            false_alarms = float(np.mean([m.false_alarm_rate for m in made]))
            open_misses = float(np.mean([m.open_miss_rate for m in made]))
            lines.append(
                f"| {data.name} | {level:3.0f} | {lead_s / 3600:.0f} h | "
                f"{cell('new_openings', 'new_openings_foreseen')} | "
                f"{cell('reopenings', 'reopenings_foreseen')} | "
                f"{cell('closings', 'closings_foreseen')} | "
                f"{recorded.false_alarm_rate:.2%} / {false_alarms:.2%} | "
                f"{recorded.open_miss_rate:.0%} / {open_misses:.0%} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="synthetic forecast seeds")
    parser.add_argument(
        "--tolerance-min", type=float, default=0.0, help="an opening counts as foreseen this close in time"
    )
    args = parser.parse_args()
    print(
        "| trace | level g/kWh | lead | new openings | foreseen: rec. / syn. | reopenings | "
        "foreseen: rec. / syn. | closings | foreseen: rec. / syn. | false alarms: rec. / syn. | "
        "open misses: rec. / syn. |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for data in (sgip("pge"), sgip("sce"), caiso_month()):
        for line in rows(data, args.seeds, 60.0 * args.tolerance_min):
            print(line)


if __name__ == "__main__":
    main()
