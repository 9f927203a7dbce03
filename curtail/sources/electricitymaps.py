"""Electricity Maps API v3: average (lifecycle) grid carbon intensity, latest, forecast, past range.

Endpoints (https://portal.electricitymaps.com/docs/api): ``GET /v3/carbon-intensity/latest``,
``/forecast`` and ``/past-range`` (``?zone=DE``), authenticated with the ``auth-token``
header. Values are already gCO2eq/kWh. The key comes from the environment only
(``ELECTRICITYMAPS_API_KEY``) and never appears in logs, errors or outputs.

These are *average* intensities, not marginal: curtailment on them is a percentile rule
(``threshold_kind = "percentile"``), not the 100 gCO2/kWh MOER threshold.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from curtail.planning.signals import Signal, iso
from curtail.planning.traces import Forecast
from curtail.sources.base import (
    CarbonSource,
    Reading,
    Secret,
    SourceDataError,
    make_forecast,
    make_signal,
    parse_instant,
)
from curtail.sources.http import JsonHttp, require

ELECTRICITYMAPS_URL = "https://api.electricitymap.org"
MAX_RANGE_S = 10 * 24 * 3600  # past-range answers at most 10 days of hourly data per request


def _z(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ElectricityMapsSource(CarbonSource):
    """Average carbon intensity of Electricity Maps zones (e.g. ``DE``, ``US-CAL-CISO``).

    Example::

        source = ElectricityMapsSource()                # ELECTRICITYMAPS_API_KEY
        source.latest("DE").ci_g_per_kwh
        source.forecast("DE")                           # a Forecast, like load_forecast's
    """

    kind = "average"

    def __init__(
        self,
        *,
        base_url: str = ELECTRICITYMAPS_URL,
        key_env: str = "ELECTRICITYMAPS_API_KEY",
        timeout_s: float = 10.0,
        clock: Any = time.time,
    ):
        self.name = "electricitymaps"
        self.key_env = key_env
        self.http = JsonHttp(self.name, base_url, timeout_s=timeout_s)
        self.clock = clock

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        key = Secret.from_env(self.key_env, source=self.name)
        self.http.add_secret(key)
        return self.http.get(path, params, headers={"auth-token": key.reveal()})

    def _point(self, point: Any) -> tuple[float, float]:
        value = require(self.name, point, "carbonIntensity")
        if value is None:
            raise SourceDataError(self.name, f"no carbonIntensity at {point.get('datetime')!r}")
        return parse_instant(self.name, require(self.name, point, "datetime")), float(value)

    def latest(self, region: str, now_s: float | None = None) -> Reading:
        answer = self._get("/v3/carbon-intensity/latest", {"zone": region})
        t_s, value = self._point(answer)
        return Reading(region, t_s, value, self.name, self.kind, fetched_s=self.clock())

    def forecast(
        self, region: str, now_s: float | None = None, *, horizon_s: float = 24 * 3600
    ) -> Forecast:
        """The current forecast, issued at its ``updatedAt``, cut to ``horizon_s``."""
        answer = self._get("/v3/carbon-intensity/forecast", {"zone": region})
        points = [self._point(p) for p in require(self.name, answer, "forecast")]
        issued = parse_instant(self.name, require(self.name, answer, "updatedAt"))
        points = [(t, v) for t, v in points if t <= issued + horizon_s] or points[:1]
        return make_forecast(
            self.name, region, [(issued, [t for t, _ in points], [v for _, v in points])]
        )

    def history(self, region: str, start_s: float, end_s: float) -> Signal:
        """Hourly past values over ``[start_s, end_s)`` (requests of at most 10 days each)."""
        points: list[tuple[float, float]] = []
        chunk_start = start_s
        while chunk_start < end_s:
            chunk_end = min(end_s, chunk_start + MAX_RANGE_S)
            answer = self._get(
                "/v3/carbon-intensity/past-range",
                {"zone": region, "start": _z(chunk_start), "end": _z(chunk_end)},
            )
            rows = answer.get("data", answer.get("history")) if isinstance(answer, dict) else None
            if not isinstance(rows, list):
                raise SourceDataError(self.name, "the answer has no 'data' list")
            points += [self._point(p) for p in rows if p.get("carbonIntensity") is not None]
            chunk_start = chunk_end
        points = [(t, v) for t, v in points if start_s <= t < end_s]
        if not points:
            raise SourceDataError(
                self.name, f"no data for {region!r} in {iso(start_s)} .. {iso(end_s)}"
            )
        return make_signal(
            self.name, region, [t for t, _ in points], [v for _, v in points], kind=self.kind
        )
