"""A Vessim-compatible HTTP source: carbon intensity served by a Vessim software-in-the-loop API.

Vessim (https://github.com/dos-group/vessim) co-simulates energy systems and exposes grid
signals to real software over HTTP. Its SiL API server answers ``GET /api/ci`` with
``{"ci": <gCO2/kWh>}``; the SiL examples route ``GET /carbon-intensity?time=<ISO>`` to a bare
number. This source reads either shape (and ``{"carbon_intensity": x}`` / ``{"value": x}``),
so a Vessim scenario — or any small service speaking the same shape — can drive a real
curtail run. An optional forecast route answers a JSON object of ``{ISO time: value}`` (what
``pandas.Series.to_json(date_format="iso")`` writes) or a list of ``{"time", "value"}``.

No credentials by default; ``token_env`` names an environment variable whose value is sent as
a bearer token (scrubbed from every message).
"""

from __future__ import annotations

import time
from typing import Any

from curtail.planning.traces import Forecast
from curtail.sources.base import (
    CarbonSource,
    Reading,
    Secret,
    SourceDataError,
    make_forecast,
    parse_instant,
    to_g_per_kwh,
)
from curtail.sources.http import JsonHttp

VALUE_KEYS = ("ci", "carbon_intensity", "value")


class VessimHttpSource(CarbonSource):
    """Carbon intensity from a Vessim SiL HTTP API (see the module doc).

    Example::

        source = VessimHttpSource("http://127.0.0.1:8000")             # GET /api/ci
        source.latest("DE").ci_g_per_kwh
    """

    def __init__(
        self,
        base_url: str,
        *,
        path: str = "/api/ci",
        forecast_path: str | None = None,
        region_param: str | None = None,
        unit: str = "g_per_kwh",
        kind: str = "marginal",
        token_env: str | None = None,
        timeout_s: float = 5.0,
        clock: Any = time.time,
    ):
        self.name = "vessim"
        self.path, self.forecast_path = path, forecast_path
        self.region_param = region_param  # e.g. "zone" for a multi-zone server; None: one signal
        self.unit = unit
        self.kind = kind
        self.token_env = token_env
        self.http = JsonHttp(self.name, base_url, timeout_s=timeout_s)
        self.clock = clock

    def _get(self, path: str, region: str, params: dict[str, Any] | None = None) -> Any:
        params = dict(params or {})
        if self.region_param:
            params[self.region_param] = region
        headers = {}
        if self.token_env:
            token = Secret.from_env(self.token_env, source=self.name)
            self.http.add_secret(token)
            headers["Authorization"] = f"Bearer {token.reveal()}"
        return self.http.get(path, params, headers=headers)

    def _value(self, answer: Any) -> float:
        if isinstance(answer, dict):
            for key in VALUE_KEYS:
                if key in answer:
                    answer = answer[key]
                    break
            else:
                raise SourceDataError(
                    self.name, f"the answer has none of the fields {list(VALUE_KEYS)}"
                )
        if isinstance(answer, bool) or not isinstance(answer, (int, float)):
            raise SourceDataError(
                self.name, f"the value {answer!r} is not a number (is the simulation running?)"
            )
        return float(to_g_per_kwh(self.name, self.unit, [answer])[0])

    def latest(self, region: str, now_s: float | None = None) -> Reading:
        """The served value, stamped with the fetch time (the API gives none)."""
        fetched = self.clock()
        value = self._value(self._get(self.path, region))
        return Reading(region, fetched, value, self.name, self.kind, fetched_s=fetched)

    def forecast(
        self, region: str, now_s: float | None = None, *, horizon_s: float = 24 * 3600
    ) -> Forecast:
        if self.forecast_path is None:
            return super().forecast(region, now_s, horizon_s=horizon_s)
        issued = self.clock() if now_s is None else now_s
        answer = self._get(self.forecast_path, region)
        if isinstance(answer, dict):
            pairs = [(parse_instant(self.name, t), self._value(v)) for t, v in answer.items()]
        elif isinstance(answer, list):
            pairs = []
            for item in answer:
                stamp = item.get("time", item.get("datetime")) if isinstance(item, dict) else None
                if stamp is None:
                    raise SourceDataError(
                        self.name, "forecast items need 'time' (or 'datetime') and 'value'"
                    )
                pairs.append((parse_instant(self.name, stamp), self._value(item)))
        else:
            raise SourceDataError(self.name, "the forecast is neither an object nor a list")
        pairs = [(t, v) for t, v in pairs if t <= issued + horizon_s]
        if not pairs:
            raise SourceDataError(self.name, f"empty forecast for region {region!r}")
        return make_forecast(
            self.name, region, [(issued, [t for t, _ in pairs], [v for _, v in pairs])]
        )
