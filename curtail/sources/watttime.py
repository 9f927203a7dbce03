"""WattTime API v3: marginal emissions (MOER) now, forecast, history, and the signal index.

Endpoints (https://docs.watttime.org): ``GET /login`` (HTTP basic auth → a bearer token valid
30 minutes), ``/v3/signal-index``, ``/v3/forecast``, ``/v3/historical`` and
``/v3/forecast/historical``, each ``?region=...&signal_type=co2_moer``. Values come in the
``meta.units`` of the answer (``lbs_co2_per_mwh`` for MOER) and are converted to gCO2/kWh here.

Credentials come from the environment only — ``WATTTIME_USER`` and ``WATTTIME_PASSWORD``, the
names the official ``watttime`` client uses — and never appear in logs, errors or outputs.

Why not the official ``watttime`` client: importing it configures the root logger, it copies
the password into ``os.environ``, retries with back-off inside every call (the poller must see
a failure at once to fall back), and it would add requests/holidays/pytz/dateutil to curtail's
dependencies. Its endpoints and parameters are mirrored here with the standard library.
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
    SignalIndex,
    SourceAuthError,
    SourceDataError,
    make_forecast,
    make_signal,
    parse_instant,
    to_g_per_kwh,
)
from curtail.sources.http import JsonHttp, require

WATTTIME_URL = "https://api.watttime.org"
TOKEN_LIFETIME_S = 30 * 60
TOKEN_REFRESH_MARGIN_S = 5 * 60
MAX_HISTORY_SPAN_S = 30 * 24 * 3600  # the API answers at most ~32 days per request


def _z(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WattTimeSource(CarbonSource):
    """Marginal operating emissions rate (``co2_moer``) of WattTime regions (e.g. ``CAISO_NORTH``).

    Example::

        source = WattTimeSource()                      # WATTTIME_USER / WATTTIME_PASSWORD
        source.latest("CAISO_NORTH").ci_g_per_kwh      # newest 5-min value of the forecast
        source.forecast("CAISO_NORTH")                 # a Forecast, like load_forecast's
        source.history("CAISO_NORTH", start_s, end_s)  # a Signal, like load_trace's
    """

    kind = "marginal"

    def __init__(
        self,
        *,
        base_url: str = WATTTIME_URL,
        user_env: str = "WATTTIME_USER",
        password_env: str = "WATTTIME_PASSWORD",
        signal_type: str = "co2_moer",
        timeout_s: float = 10.0,
        clock: Any = time.time,
    ):
        self.name = "watttime"
        self.user_env, self.password_env = user_env, password_env
        self.signal_type = signal_type
        self.http = JsonHttp(self.name, base_url, timeout_s=timeout_s)
        self.clock = clock
        self._token: Secret | None = None
        self._token_expires_s = 0.0

    # -------------------------------------------------------------- auth

    def _credentials(self) -> tuple[Secret, Secret]:
        user = Secret.from_env(self.user_env, source=self.name)
        password = Secret.from_env(self.password_env, source=self.name)
        self.http.add_secret(password)
        return user, password

    def _bearer(self) -> dict[str, str]:
        if self._token is None or self.clock() >= self._token_expires_s:
            answer = self.http.get("/login", basic_auth=self._credentials())
            token = answer.get("token") if isinstance(answer, dict) else None
            if not token:
                raise SourceAuthError(
                    self.name, "login answered without a token: check the credentials"
                )
            self._token = Secret(str(token), "watttime token")
            self.http.add_secret(self._token)
            self._token_expires_s = self.clock() + TOKEN_LIFETIME_S - TOKEN_REFRESH_MARGIN_S
        return {"Authorization": f"Bearer {self._token.reveal()}"}

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        """A data call; one fresh login if the token was refused (it expires after 30 min)."""
        try:
            return self.http.get(path, params, headers=self._bearer())
        except SourceAuthError:
            self._token = None
            return self.http.get(path, params, headers=self._bearer())

    # -------------------------------------------------------------- parsing

    def _points(
        self, answer: Any, region: str, field: str = "data"
    ) -> tuple[list[float], list[float], str]:
        points = require(self.name, answer, field)
        units = require(self.name, answer, "meta", "units")
        if not isinstance(points, list):
            raise SourceDataError(self.name, f"{field!r} is not a list")
        times = [parse_instant(self.name, require(self.name, p, "point_time")) for p in points]
        values = [float(require(self.name, p, "value")) for p in points]
        return times, list(to_g_per_kwh(self.name, units, values)), units

    def _period_s(self, answer: Any) -> float | None:
        meta = answer.get("meta", {}) if isinstance(answer, dict) else {}
        period = meta.get("data_point_period_seconds")
        return float(period) if period else None

    # -------------------------------------------------------------- the interface

    def latest(self, region: str, now_s: float | None = None) -> Reading:
        """The current MOER: the first point of the newest forecast (WattTime's own "now" value)."""
        answer = self._get(
            "/v3/forecast", {"region": region, "signal_type": self.signal_type, "horizon_hours": 1}
        )
        times, values, _ = self._points(answer, region)
        if not times:
            raise SourceDataError(self.name, f"empty forecast for region {region!r}")
        first = min(range(len(times)), key=times.__getitem__)
        return Reading(
            region, times[first], float(values[first]), self.name, self.kind, fetched_s=self.clock()
        )

    def signal_index(self, region: str) -> SignalIndex:
        """The real-time percentile (0 cleanest .. 100 dirtiest) of the region's MOER."""
        answer = self._get("/v3/signal-index", {"region": region, "signal_type": self.signal_type})
        points = require(self.name, answer, "data")
        if not points:
            raise SourceDataError(self.name, f"empty signal index for region {region!r}")
        point = points[0]
        percentile = float(require(self.name, point, "value"))
        if not 0 <= percentile <= 100:
            raise SourceDataError(self.name, f"signal index {percentile} is not a percentile")
        return SignalIndex(
            region,
            parse_instant(self.name, require(self.name, point, "point_time")),
            percentile,
            self.name,
        )

    def forecast(
        self, region: str, now_s: float | None = None, *, horizon_s: float = 24 * 3600
    ) -> Forecast:
        """The newest forecast (``now_s`` is ignored: WattTime serves the current one)."""
        answer = self._get(
            "/v3/forecast",
            {
                "region": region,
                "signal_type": self.signal_type,
                "horizon_hours": round(horizon_s / 3600),
            },
        )
        times, values, _ = self._points(answer, region)
        generated = parse_instant(self.name, require(self.name, answer, "meta", "generated_at"))
        return make_forecast(self.name, region, [(generated, times, values)])

    def forecast_history(
        self, region: str, start_s: float, end_s: float, *, horizon_s: float = 24 * 3600
    ) -> Forecast:
        """Every forecast issued in ``[start_s, end_s]`` — what a policy would have seen then."""
        issues = []
        for chunk_start, chunk_end in _chunks(start_s, end_s, 24 * 3600):
            answer = self._get(
                "/v3/forecast/historical",
                {
                    "region": region,
                    "signal_type": self.signal_type,
                    "start": _z(chunk_start),
                    "end": _z(chunk_end),
                    "horizon_hours": round(horizon_s / 3600),
                },
            )
            units = require(self.name, answer, "meta", "units")
            for issue in require(self.name, answer, "data"):
                generated = parse_instant(self.name, require(self.name, issue, "generated_at"))
                points = require(self.name, issue, "forecast")
                times = [
                    parse_instant(self.name, require(self.name, p, "point_time")) for p in points
                ]
                values = to_g_per_kwh(
                    self.name, units, [float(require(self.name, p, "value")) for p in points]
                )
                if not any(generated == seen for seen, _, _ in issues):
                    issues.append((generated, times, values))
        return make_forecast(self.name, region, issues)

    def history(self, region: str, start_s: float, end_s: float) -> Signal:
        """Recorded MOER over ``[start_s, end_s)`` (requests of at most 30 days each)."""
        times: list[float] = []
        values: list[float] = []
        period = None
        for chunk_start, chunk_end in _chunks(start_s, end_s, MAX_HISTORY_SPAN_S):
            answer = self._get(
                "/v3/historical",
                {
                    "region": region,
                    "signal_type": self.signal_type,
                    "start": _z(chunk_start),
                    "end": _z(chunk_end),
                },
            )
            chunk_times, chunk_values, _ = self._points(answer, region)
            times += chunk_times
            values += chunk_values
            period = period or self._period_s(answer)
        keep = [i for i, t in enumerate(times) if start_s <= t < end_s]
        if not keep:
            raise SourceDataError(
                self.name, f"no data for {region!r} in {iso(start_s)} .. {iso(end_s)}"
            )
        return make_signal(
            self.name,
            region,
            [times[i] for i in keep],
            [values[i] for i in keep],
            kind=self.kind,
            resolution_s=period,
        )


def _chunks(start_s: float, end_s: float, span_s: float) -> list[tuple[float, float]]:
    chunks = []
    while start_s < end_s:
        chunks.append((start_s, min(end_s, start_s + span_s)))
        start_s += span_s
    return chunks
