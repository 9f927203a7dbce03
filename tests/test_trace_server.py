"""The trace server against the real WattTime client: the paper trace served at an accelerated
clock, read back exactly, never past the server's "now", and turned by the online calendar into
the offline calendar's windows. No Ray; a few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from curtail.config import CurtailmentRules, TraceSource
from curtail.planning.online_calendar import OnlineCalendar
from curtail.planning.signals import Signal
from curtail.planning.traces import load_trace
from curtail.planning.windows import compute_windows
from curtail.sources.base import SourceAuthError, SourceRequestError, make_forecast
from curtail.sources.trace_server import TraceServer
from curtail.sources.watttime import WattTimeSource

REPO = Path(__file__).resolve().parents[1]
PAPER_TRACE = REPO / "data/traces/watttime_moer_2026-01-11_4regions.csv"
STEP_S = 300.0


@pytest.fixture(scope="module")
def paper() -> dict[str, Signal]:
    return load_trace(TraceSource(path=PAPER_TRACE)).signals


@pytest.fixture
def credentials(monkeypatch):
    # a test server: any username and password log in
    monkeypatch.setenv("WATTTIME_USER", "anyone")
    monkeypatch.setenv("WATTTIME_PASSWORD", "anything-at-all")


def prefix(signal: Signal, now_s: float) -> Signal:
    """The trace's samples at or before ``now_s``: all a live reader may have seen."""
    keep = signal.times_s <= now_s
    return Signal(
        signal.region, signal.times_s[keep], signal.ci_g_per_kwh[keep], signal.resolution_s
    )


def test_client_polling_the_accelerated_server_sees_the_trace_and_nothing_later(paper, credentials):
    signal = paper["CAISO_NORTH"]
    with TraceServer(paper, speedup=3000) as server:  # one 5-min sample per 0.1 s
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        seen = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            before = server.now_s()
            reading = source.latest("CAISO_NORTH")
            after = server.now_s()
            # the sample in force when the server answered: not older than at `before`, never after `after`
            assert prefix(signal, before).times_s[-1] <= reading.t_s <= after
            seen.append(reading)
            time.sleep(0.02)
        before = server.now_s()
        history = source.history("CAISO_NORTH", signal.start_s, signal.end_s)
        after = server.now_s()
        logins = server.logins

    times = [r.t_s for r in seen]
    assert times == sorted(times)
    assert len(set(times)) >= 5, "the server's clock did not advance"
    index = np.searchsorted(signal.times_s, times)
    np.testing.assert_array_equal(signal.times_s[index], times)  # only the trace's own instants
    # lbs/MWh on the wire, gCO2/kWh after the client's conversion: the trace's values
    np.testing.assert_allclose(
        [r.ci_g_per_kwh for r in seen], signal.ci_g_per_kwh[index], rtol=1e-12
    )
    # history: the trace from its start up to the server's clock, nothing later
    assert (
        len(prefix(signal, before).times_s)
        <= len(history.times_s)
        <= len(prefix(signal, after).times_s)
    )
    expected = prefix(signal, history.times_s[-1])
    np.testing.assert_array_equal(history.times_s, expected.times_s)
    np.testing.assert_allclose(history.ci_g_per_kwh, expected.ci_g_per_kwh, rtol=1e-12)
    assert history.times_s[-1] < signal.times_s[-1]  # the trace's future stayed unserved
    assert logins == 1  # one token for every call


@pytest.mark.parametrize("region", ["CAISO_NORTH", "SPP_TX", "NEM_SA"])
def test_online_calendar_on_served_readings_equals_the_offline_calendar(paper, credentials, region):
    signal = paper[region]
    wall = [0.0]
    rules = CurtailmentRules()
    calendar = OnlineCalendar(region, rules)
    compared = 0
    # speedup 300: one trace sample per (stepped) wall second
    with TraceServer(paper, speedup=STEP_S, clock=lambda: wall[0]) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        for k in range(len(signal.times_s)):
            for offset in (0.0, 0.5):  # on the sample and between samples: the second is a repeat
                wall[0] = k + offset
                reading = source.latest(region)
                assert reading.t_s == signal.times_s[k] <= server.now_s()
                assert reading.ci_g_per_kwh == pytest.approx(signal.ci_g_per_kwh[k], rel=1e-12)
                assert calendar.add(reading.t_s, reading.ci_g_per_kwh) is (offset == 0.0)
            if k % 24 == 23 or k == len(signal.times_s) - 1:
                seen = prefix(signal, server.now_s())
                offline = compute_windows(region, seen, rules)
                assert calendar.windows(until_s=seen.end_s) == offline
                compared += 1
    assert compared == 10
    assert calendar.windows(until_s=signal.end_s) == compute_windows(region, signal, rules)
    assert len(calendar.windows(until_s=signal.end_s)) >= 1  # the comparison is not vacuous


def test_history_forecast_and_index_stop_at_the_server_clock(paper, credentials):
    signal = paper["CAISO_NORTH"]
    start_s = signal.start_s
    # recorded forecasts issued at half past every hour, 3 points ahead; the later ones are the future
    issues = [
        (issued, [issued + k * STEP_S for k in (1, 2, 3)], [50.0 + h] * 3)
        for h, issued in enumerate(start_s + 1800 + 3600 * np.arange(6))
    ]
    forecasts = {"CAISO_NORTH": make_forecast("recorded", "CAISO_NORTH", issues)}
    wall = [0.0]
    with TraceServer(paper, speedup=1.0, forecasts=forecasts, clock=lambda: wall[0]) as server:
        source = WattTimeSource(base_url=server.url, timeout_s=5)
        wall[0] = 2.5 * 3600  # trace now: 2 h 30 min in
        now_s = server.now_s()
        history = source.history("CAISO_NORTH", start_s, signal.end_s)
        np.testing.assert_array_equal(history.times_s, prefix(signal, now_s).times_s)

        forecast = source.forecast("CAISO_NORTH", horizon_s=3600)
        targets, values = forecast.latest(now_s)
        current = prefix(signal, now_s)
        # WattTime's "now" value first, then the forecast issued at 2 h 30 (not the one at 3 h 30)
        np.testing.assert_array_equal(targets, current.times_s[-1] + STEP_S * np.arange(4))
        np.testing.assert_allclose(values, [current.ci_g_per_kwh[-1], 52.0, 52.0, 52.0], rtol=1e-12)

        past = source.forecast_history("CAISO_NORTH", start_s, signal.end_s)
        np.testing.assert_array_equal(past.request_s, start_s + 1800 + 3600 * np.arange(3))

        index = source.signal_index("CAISO_NORTH")
        assert index.t_s == current.times_s[-1] and 0 <= index.percentile <= 100
        expected = 100 * np.mean(current.ci_g_per_kwh < current.ci_g_per_kwh[-1])
        assert index.percentile == pytest.approx(expected)

        with pytest.raises(SourceRequestError, match="no recorded forecasts for region 'SPP_TX'"):
            source.forecast_history("SPP_TX", start_s, signal.end_s)
        with pytest.raises(SourceRequestError, match="unknown region 'MARS'"):
            source.latest("MARS")


def test_the_token_flow_is_required_and_tokens_expire(paper, monkeypatch, credentials):
    wall = [0.0]
    with TraceServer(paper, speedup=60, token_lifetime_s=100, clock=lambda: wall[0]) as server:
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token: 401
            urllib.request.urlopen(f"{server.url}/v3/forecast?region=CAISO_NORTH", timeout=5)
        assert refused.value.code == 401

        source = WattTimeSource(base_url=server.url, timeout_s=5)
        first = source.latest("CAISO_NORTH")
        source.latest("SPP_TX")
        assert server.logins == 1
        wall[0] = 101.0  # the server refuses the token now; the client logs in again by itself
        later = source.latest("CAISO_NORTH")
        assert server.logins == 2
        assert later.t_s == first.t_s + 6000  # 101 wall s x 60 = 6060 trace s: 20 samples on

        monkeypatch.delenv("WATTTIME_PASSWORD")
        with pytest.raises(SourceAuthError, match="WATTTIME_PASSWORD is not set"):
            WattTimeSource(base_url=server.url).latest("CAISO_NORTH")


def test_command_line_prints_its_url_and_serves():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "curtail.sources.trace_server",
            str(PAPER_TRACE),
            "--speedup",
            "600",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = line.split()[0]
        assert url.startswith("http://127.0.0.1:")
        request = urllib.request.Request(
            f"{url}/login", headers={"Authorization": "Basic dTpw"}
        )  # u:p
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read())["token"]
    finally:
        process.terminate()
        process.wait(timeout=10)
