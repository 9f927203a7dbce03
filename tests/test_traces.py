"""Trace loading: every defect is reported with the file, the exact line and a remedy; real traces
load to UTC signals in gCO2/kWh with lbs/MWh converted exactly once."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planning_fixtures import TRACES

from curtail.config import ForecastSource, TraceSource, parse_experiment
from curtail.planning.plan import plan_run
from curtail.planning.traces import (
    LBS_PER_MWH_TO_G_PER_KWH,
    TraceError,
    load_forecast,
    load_trace,
    load_traces,
)

HEADER = "time,R"


def write(tmp_path: Path, lines: list[str], name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(
    values: list[str] | list[float],
    *,
    start: str = "2026-01-11 17:00",
    step_min: int = 5,
    offset: str = "+00:00",
) -> list[str]:
    t0 = datetime.fromisoformat(start)
    return [
        f"{(t0 + timedelta(minutes=step_min * i)).isoformat(sep=' ')}{offset},{v}"
        for i, v in enumerate(values)
    ]


def load_error(path: Path, **source) -> TraceError:
    with pytest.raises(TraceError) as info:
        load_trace(TraceSource(path=path, **source))
    return info.value


def assert_names(error: TraceError, path: Path, line: int | None) -> str:
    """The message names the file, the exact line (data row i sits on line i + 2) and a remedy."""
    message = str(error)
    assert str(path) in message
    if line is None:
        assert error.line is None
    else:
        assert error.line == line
        assert f"{path}, line {line}:" in message
    assert "Fix: " in message and len(message.split("Fix: ", 1)[1]) > 10
    return message


# ------------------------------------------------------------------------------- each defect


def test_unsorted_timestamps(tmp_path):
    lines = rows([200, 210, 220, 230])
    lines[2], lines[3] = (
        lines[3].split(",")[0] + ",220",
        lines[2].split(",")[0] + ",230",
    )  # rows 2, 3 swapped
    path = write(tmp_path, [HEADER, *lines])
    message = assert_names(load_error(path), path, line=5)
    assert "out-of-order" in message and "sort" in message


def test_duplicate_timestamp(tmp_path):
    lines = rows([200, 210, 220, 230])
    lines[2] = lines[1].split(",")[0] + ",220"
    path = write(tmp_path, [HEADER, *lines])
    message = assert_names(load_error(path), path, line=4)
    assert "duplicate" in message and "one row per timestamp" in message


@pytest.mark.parametrize("cell", ["NaN", "nan", "", "  ", "inf"])
def test_missing_value(tmp_path, cell):
    path = write(tmp_path, [HEADER, *rows(["200", "210", cell, "230"])])
    message = assert_names(load_error(path), path, line=4)
    assert "missing or non-numeric" in message and "'R'" in message


def test_non_numeric_value(tmp_path):
    path = write(tmp_path, ["time,A,B", *[r + ",5" for r in rows(["200", "210", "220", "n/a"])]])
    message = assert_names(load_error(path), path, line=5)
    assert "'n/a'" in message and "'B'" not in message and "'A'" in message


def test_negative_value(tmp_path):
    path = write(tmp_path, [HEADER, *rows([200, -3.5, 220])])
    message = assert_names(load_error(path), path, line=3)
    assert "negative" in message and "-3.5" in message


def test_gap_longer_than_max_gap(tmp_path):
    lines = rows([200, 210, 220, 230, 240])
    del lines[2]  # 17:05 -> 17:15: a 600 s gap before the row now on line 4
    path = write(tmp_path, [HEADER, *lines])
    message = assert_names(load_error(path, max_gap_s=300), path, line=4)
    assert "gap of 600 s" in message and "max_gap_s" in message
    assert len(load_trace(TraceSource(path=path, max_gap_s=600)).signals["R"].times_s) == 4


def test_naive_timestamps_need_a_zone(tmp_path):
    path = write(tmp_path, [HEADER, *rows([200, 210], offset="")])
    message = assert_names(load_error(path), path, line=2)
    assert 'naive_timezone = "UTC"' in message
    signal = load_trace(TraceSource(path=path, naive_timezone="UTC")).signals["R"]
    assert signal.times_s[0] == datetime(2026, 1, 11, 17, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("naive_row", [0, 2, 4])
def test_mixed_offset_and_naive_timestamps(tmp_path, naive_row):
    lines = rows([200, 210, 220, 230, 240])
    lines[naive_row] = lines[naive_row].replace("+00:00", "")
    path = write(tmp_path, [HEADER, *lines])
    message = assert_names(load_error(path, naive_timezone="UTC"), path, line=naive_row + 2)
    assert "mixes timestamps with and without" in message


@pytest.mark.parametrize("offset", ["+00:00", ""])
@pytest.mark.parametrize("bad_row", [0, 3])
@pytest.mark.parametrize("text", ["2026-13-01 00:00", "yesterday", ""])
def test_unparseable_timestamp(tmp_path, offset, bad_row, text):
    lines = rows([200, 210, 220, 230], offset=offset)
    lines[bad_row] = f"{text},{lines[bad_row].split(',')[1]}"
    path = write(tmp_path, [HEADER, *lines])
    message = assert_names(load_error(path, naive_timezone="UTC"), path, line=bad_row + 2)
    assert "cannot read timestamp" in message and "ISO-8601" in message


def test_implausibly_large_values_mean_lbs_per_mwh(tmp_path):
    path = write(tmp_path, [HEADER, *rows([900, 1022, 1800, 1000])])  # lbs/MWh, coal on the margin
    message = assert_names(load_error(path), path, line=4)
    assert "above any real grid" in message and "unit = 'lbs_per_mwh'" in message
    signal = load_trace(TraceSource(path=path, unit="lbs_per_mwh")).signals["R"]
    np.testing.assert_array_equal(signal.ci_g_per_kwh, np.array([900, 1022, 1800, 1000]) * 0.453592)


def test_region_missing_names_site_and_files(tmp_path):
    path = write(tmp_path, ["time,CAISO_NORTH", *rows([200, 210])])
    traces = load_traces([TraceSource(path=path)])
    with pytest.raises(TraceError) as info:
        traces.signal("SPP_TX", needed_by="spp_tx")
    message = assert_names(info.value, path, line=None)
    assert "'SPP_TX'" in message and "'spp_tx'" in message and "['CAISO_NORTH']" in message


def _config(path: Path, **run) -> dict:
    return {
        "traces": [{"path": str(path)}],
        "sites": {
            "a": {
                "region": "R",
                "training_power_w": 2024,
                "idle_power_w": 468,
                "tokens_per_s": 1000,
            }
        },
        "token_budget": 1e9,
        "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": ["a"], **run}],
    }


def test_site_region_missing_via_plan_run(tmp_path):
    path = write(tmp_path, [HEADER, *rows([200, 210])])
    config = _config(path)
    config["sites"]["a"]["region"] = "Q"
    experiment = parse_experiment(config)
    with pytest.raises(TraceError, match=r"no trace has region 'Q' \(needed by site 'a'\)"):
        plan_run(experiment, experiment.runs[0], load_traces(experiment.traces))


def test_run_outlasting_the_trace(tmp_path):
    path = write(
        tmp_path, [HEADER, *rows([200] * 12)]
    )  # 17:00 .. 18:00 (last sample valid to 18:00)
    traces = load_traces([TraceSource(path=path)])
    start = datetime(2026, 1, 11, 17, tzinfo=UTC).timestamp()
    traces.require_span("R", start, start + 3600)  # exactly covered: fine
    for span in [(start, start + 3601), (start - 1, start + 600)]:
        with pytest.raises(TraceError) as info:
            traces.require_span("R", *span, needed_by="a")
        message = assert_names(info.value, path, line=None)
        assert "covers only 2026-01-11T17:00:00Z .. 2026-01-11T18:00:00Z" in message

    experiment = parse_experiment(_config(path, deadline="2026-01-11T19:00:00Z"))
    with pytest.raises(
        TraceError, match="the run spans 2026-01-11T17:00:00Z .. 2026-01-11T19:00:00Z"
    ):
        plan_run(experiment, experiment.runs[0], traces)
    experiment = parse_experiment(_config(path, start="2026-01-11T16:00:00+00:00"))
    with pytest.raises(TraceError, match="move the run's start/deadline inside the trace"):
        plan_run(experiment, experiment.runs[0], traces)
    experiment = parse_experiment(_config(path, start="2026-01-11T18:30:00Z"))  # after the trace
    with pytest.raises(TraceError, match="ends before it starts"):
        plan_run(experiment, experiment.runs[0], traces)
    experiment = parse_experiment(_config(path, deadline="2026-01-11T18:00:00Z"))
    assert plan_run(experiment, experiment.runs[0], traces).context.deadline_s == start + 3600


# ------------------------------------------------------------------------------- real traces


def utc(text: str) -> float:
    return pd.Timestamp(text).timestamp()


def test_paper_trace():
    traces = load_traces([TraceSource(path=TRACES / "watttime_moer_2026-01-11_4regions.csv")])
    assert sorted(traces.signals) == ["CAISO_NORTH", "DE", "NEM_SA", "SPP_TX"]
    for signal in traces.signals.values():
        assert len(signal.times_s) == 217
        assert signal.start_s == utc("2026-01-11T17:00Z")
        assert signal.times_s[-1] == utc("2026-01-12T11:00Z")
        assert signal.resolution_s == 300 and signal.end_s == utc("2026-01-12T11:05Z")
    assert traces.signals["CAISO_NORTH"].ci_g_per_kwh[0] == pytest.approx(463.571024, abs=1e-9)
    assert traces.signals["DE"].ci_g_per_kwh[0] == pytest.approx(721.1659208, abs=1e-9)
    assert len(traces.checksums) == 1 and all(len(c) == 64 for c in traces.checksums.values())


def test_caiso_month_with_naive_timezone():
    path = TRACES / "watttime_moer_2023-06_caiso-north_actual.csv"
    signal = load_trace(TraceSource(path=path, naive_timezone="UTC")).signals["Caiso_North"]
    assert len(signal.times_s) == 8928 and signal.resolution_s == 300
    assert signal.start_s == utc("2023-06-08T00:00Z") and signal.times_s[-1] == utc(
        "2023-07-08T23:55Z"
    )
    assert signal.ci_g_per_kwh[0] == pytest.approx(425.01605069, abs=1e-9)
    pacific = load_trace(TraceSource(path=path, naive_timezone="America/Los_Angeles")).signals[
        "Caiso_North"
    ]
    assert pacific.start_s == utc("2023-06-08T07:00Z")  # PDT is UTC-7 in June
    renamed = load_trace(
        TraceSource(path=path, naive_timezone="UTC", columns={"Caiso_North": "CAISO_NORTH"})
    )
    assert list(renamed.signals) == ["CAISO_NORTH"]


@pytest.mark.parametrize(
    "name, region, count, resolution_s, first",
    [
        ("avg_ci_2020_germany.csv", "DE_avg", 37147, 900, 218.29003068829462),
        ("avg_ci_2020_great-britain.csv", "GB_avg", 21980, 1800, 120.99546661944396),
    ],
)
def test_average_ci_files_renamed(name, region, count, resolution_s, first):
    source = TraceSource(
        path=TRACES / name,
        signal="average",
        naive_timezone="UTC",
        columns={"Carbon Intensity": region},
    )
    signals = load_trace(source).signals
    assert list(signals) == [region]
    signal = signals[region]
    assert (
        signal.kind == "average"
        and len(signal.times_s) == count
        and signal.resolution_s == resolution_s
    )
    assert signal.start_s == utc("2019-12-20T00:00Z")
    assert signal.ci_g_per_kwh[0] == first


def test_forecast_gz():
    forecast = load_forecast(
        ForecastSource(
            path=TRACES / "watttime_moer_2023-06_caiso-north_forecast.csv.gz",
            region="CAISO_NORTH",
            naive_timezone="UTC",
        )
    )
    assert len(forecast.target_s) == 115932 and len(forecast.request_s) == 8917
    assert forecast.request_s[0] == utc("2023-06-08T00:00Z") and forecast.target_s[0] == utc(
        "2023-06-08T00:05Z"
    )
    assert forecast.ci_g_per_kwh[0] == pytest.approx(412.406182804, abs=1e-9)
    assert forecast.latest(forecast.request_s[0] - 1) is None
    targets, values = forecast.latest(forecast.request_s[0] + 150)
    assert (
        targets[0] == utc("2023-06-08T00:05Z")
        and np.all(np.diff(targets) > 0)
        and len(values) == len(targets)
    )


def test_lbs_per_mwh_converted_exactly_once(tmp_path):
    """The paper trace is WattTime lbs/MWh × 0.453592; writing the lbs values back and loading
    them as lbs_per_mwh (by file, by experiment and by plan) gives the paper's g/kWh once."""
    paper = load_trace(TraceSource(path=TRACES / "watttime_moer_2026-01-11_4regions.csv")).signals
    lbs = {region: s.ci_g_per_kwh / LBS_PER_MWH_TO_G_PER_KWH for region, s in paper.items()}
    # CAISO_NORTH was WattTime's integer lbs/MWh, converted once before it reached the file
    np.testing.assert_allclose(lbs["CAISO_NORTH"], np.round(lbs["CAISO_NORTH"]), rtol=0, atol=1e-9)
    lbs["CAISO_NORTH"] = np.round(lbs["CAISO_NORTH"])
    assert (
        lbs["NEM_SA"].max() > 1500 > paper["NEM_SA"].ci_g_per_kwh.max()
    )  # lbs read as g/kWh: refused

    times = pd.to_datetime(paper["CAISO_NORTH"].times_s, unit="s", utc=True)
    path = tmp_path / "lbs.csv"
    pd.DataFrame({"time": times, "R": lbs["CAISO_NORTH"], "NEM_SA": lbs["NEM_SA"]}).to_csv(
        path, index=False
    )
    with pytest.raises(TraceError, match="lbs_per_mwh"):
        load_trace(TraceSource(path=path))
    loaded = load_trace(TraceSource(path=path, unit="lbs_per_mwh")).signals
    np.testing.assert_array_equal(loaded["R"].ci_g_per_kwh, lbs["CAISO_NORTH"] * 0.453592)
    np.testing.assert_allclose(
        loaded["NEM_SA"].ci_g_per_kwh, paper["NEM_SA"].ci_g_per_kwh, rtol=1e-12
    )
    lbs = lbs["CAISO_NORTH"]

    config = _config(path)
    config["traces"][0]["unit"] = "lbs_per_mwh"
    experiment = parse_experiment(config)
    plan = plan_run(experiment, experiment.runs[0], load_traces(experiment.traces))
    np.testing.assert_array_equal(plan.signals["a"].ci_g_per_kwh, lbs * 0.453592)
    np.testing.assert_array_equal(plan.context.signals["a"].ci_g_per_kwh, lbs * 0.453592)

    forecast_path = tmp_path / "forecast.csv"
    forecast_path.write_text(
        "request_time,forecast_time,R\n2026-01-11T17:00Z,2026-01-11T17:05Z,1022\n"
    )
    forecast = load_forecast(ForecastSource(path=forecast_path, region="R", unit="lbs_per_mwh"))
    assert forecast.ci_g_per_kwh[0] == 1022 * 0.453592


# ------------------------------------------------------------------------------- properties

OFFSETS = ["+00:00", "Z", "+05:30", "-08:00", "+0100", ""]  # "" = naive, read as UTC


@st.composite
def well_formed_traces(draw):
    n = draw(st.integers(1, 30))
    start_s = draw(st.integers(946684800, 4102444800))  # 2000 .. 2100
    steps = draw(st.lists(st.integers(1, 3600), min_size=n - 1, max_size=n - 1))
    times_s = np.cumsum([start_s, *steps]).astype(float)
    columns = draw(st.integers(1, 3))
    values = draw(
        st.lists(
            st.lists(
                st.floats(0, 1500, allow_nan=False) | st.integers(0, 1500), min_size=n, max_size=n
            ),
            min_size=columns,
            max_size=columns,
        )
    )
    offsets = draw(st.lists(st.sampled_from(OFFSETS[:-1]), min_size=n, max_size=n))
    if draw(st.booleans()):
        offsets = [""] * n
    return times_s, np.array(values, dtype=float), offsets


def format_time(t_s: float, offset: str) -> str:
    if offset in ("", "Z"):
        return datetime.fromtimestamp(t_s, UTC).strftime("%Y-%m-%dT%H:%M:%S") + offset
    sign = 1 if offset[0] == "+" else -1
    hours, minutes = int(offset[1:3]), int(offset[-2:])
    zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return datetime.fromtimestamp(t_s, zone).strftime("%Y-%m-%dT%H:%M:%S") + offset


def trace_lines(times_s, values, offsets) -> list[str]:
    header = "time," + ",".join(f"R{c}" for c in range(len(values)))
    body = [
        ",".join([format_time(t, offsets[i]), *(repr(float(v)) for v in values[:, i])])
        for i, t in enumerate(times_s)
    ]
    return [header, *body]


PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(trace=well_formed_traces())
def test_well_formed_traces_round_trip(tmp_path_factory, trace):
    times_s, values, offsets = trace
    path = write(
        tmp_path_factory.getbasetemp(), trace_lines(times_s, values, offsets), "round_trip.csv"
    )
    loaded = load_trace(TraceSource(path=path, naive_timezone="UTC", max_gap_s=3600))
    assert sorted(loaded.signals) == [f"R{c}" for c in range(len(values))]
    for c, column in enumerate(values):
        signal = loaded.signals[f"R{c}"]
        np.testing.assert_array_equal(signal.times_s, times_s)
        np.testing.assert_array_equal(signal.ci_g_per_kwh, column)


@PROPERTY_SETTINGS
@given(trace=well_formed_traces(), data=st.data())
def test_one_corrupted_row_is_named(tmp_path_factory, trace, data):
    times_s, values, offsets = trace
    n = len(times_s)
    kinds = ["nan", "empty", "text", "negative", "huge", "bad_time"] + (
        ["swap", "duplicate"] if n >= 2 else []
    )
    kind = data.draw(st.sampled_from(kinds), label="kind")
    row = data.draw(st.integers(1 if kind in ("swap", "duplicate") else 0, n - 1), label="row")
    column = data.draw(st.integers(0, len(values) - 1), label="column")
    lines = trace_lines(times_s, values, offsets)
    cells = lines[row + 1].split(",")
    if kind in ("nan", "empty", "text", "negative", "huge"):
        cells[column + 1] = {
            "nan": "NaN",
            "empty": "",
            "text": "12;5",
            "negative": "-1.5",
            "huge": "4000",
        }[kind]
    elif kind == "bad_time":
        cells[0] = "2026-02-30T00:00:00" + offsets[row]
    elif kind == "swap":  # rows row-1 and row trade timestamps
        previous = lines[row].split(",")
        previous[0], cells[0] = cells[0], previous[0]
        lines[row] = ",".join(previous)
    elif kind == "duplicate":
        cells[0] = lines[row].split(",")[0]
    lines[row + 1] = ",".join(cells)
    path = write(tmp_path_factory.getbasetemp(), lines, "corrupted.csv")
    with pytest.raises(TraceError) as info:
        load_trace(TraceSource(path=path, naive_timezone="UTC", max_gap_s=3600))
    assert info.value.line == row + 2, (kind, str(info.value))
    assert re.search(rf", line {row + 2}: .+\. Fix: .+", str(info.value))


def test_a_missing_header_is_named_even_when_the_first_row_repeats_a_value(tmp_path: Path) -> None:
    """Found by the fuzzer: a headerless wide file whose first row has equal values was
    reported as a repeated column name, not as the missing header it is."""
    path = tmp_path / "trace.csv"
    path.write_text("2026-01-11 00:00:00+00:00,0.0,0.0\n2026-01-11 00:05:00+00:00,1.0,2.0\n")
    message = assert_names(load_error(path), path, 1)
    assert "looks like data" in message and "add a header line" in message


# ------------------------------------------------------------------------------- wide forecasts

WIDE_HEADER = "request_time,ahead_5min,ahead_10min,ahead_15min"


def wide(tmp_path: Path, lines: list[str]) -> Path:
    return write(tmp_path, [WIDE_HEADER, *lines], "forecast.csv")


def wide_rows(count: int) -> list[str]:
    return [
        f"2020-04-01 0{i // 12}:{5 * (i % 12):02d}:00+00:00,{100 + i},{110 + i},{120 + i}"
        for i in range(count)
    ]


def load_wide_error(path: Path, **source) -> TraceError:
    with pytest.raises(TraceError) as info:
        load_forecast(ForecastSource(path=path, region="R", **source))
    return info.value


def test_a_wide_forecast_equals_the_same_forecast_in_long_rows(tmp_path):
    """One row per issued forecast and a column per lead loads to the same :class:`Forecast`
    as WattTime's long layout (one row per value)."""
    lines = wide_rows(3)
    long_lines = ["request_time,forecast_time,R"]
    for line in lines:
        request, *values = line.split(",")
        issued = datetime.fromisoformat(request)
        for minutes, value in zip((5, 10, 15), values):
            long_lines.append(f"{request},{(issued + timedelta(minutes=minutes)).isoformat(sep=' ')},{value}")
    by_row = load_forecast(ForecastSource(path=wide(tmp_path, lines), region="R"))
    by_value = load_forecast(ForecastSource(path=write(tmp_path, long_lines, "long.csv"), region="R"))
    for name in ("request_s", "offsets", "target_s", "ci_g_per_kwh"):
        assert np.array_equal(getattr(by_row, name), getattr(by_value, name)), name
    assert by_row.ci_g_per_kwh[:3].tolist() == [100, 110, 120]
    assert by_row.target_s[0] - by_row.request_s[0] == 300


def test_a_wide_forecast_in_lbs_per_mwh_is_converted_once(tmp_path):
    forecast = load_forecast(ForecastSource(path=wide(tmp_path, wide_rows(2)), region="R", unit="lbs_per_mwh"))
    assert forecast.ci_g_per_kwh[0] == pytest.approx(100 * LBS_PER_MWH_TO_G_PER_KWH)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("request_time,ahead_5min,ahead_10min,lead_15", "'lead_15' is not a lead"),
        ("request_time,ahead_5min,ahead_0min,ahead_15min", "'ahead_0min' is not a lead"),
        ("request_time,ahead_10min,ahead_5min,ahead_15min", "'ahead_5min' is not after"),
    ],
)
def test_a_wide_forecast_names_a_bad_lead_column(tmp_path, header, words):
    path = write(tmp_path, [header, *wide_rows(2)], "forecast.csv")
    message = assert_names(load_wide_error(path), path, 1)
    assert words in message


def test_a_wide_forecast_names_a_bad_cell_and_an_unsorted_row(tmp_path):
    lines = wide_rows(4)
    lines[2] = lines[2].rsplit(",", 1)[0] + ",x"
    path = wide(tmp_path, lines)
    message = assert_names(load_wide_error(path), path, 4)
    assert "'x' in column 'ahead_15min'" in message
    lines = wide_rows(4)
    lines[1], lines[2] = lines[2], lines[1]
    path = wide(tmp_path, lines)
    assert "out-of-order" in assert_names(load_wide_error(path), path, 4)
    path = wide(tmp_path, [line.replace("+00:00", "") for line in wide_rows(2)])
    assert "no time zone" in assert_names(load_wide_error(path), path, 2)
    assert load_forecast(ForecastSource(path=path, region="R", naive_timezone="UTC")).request_s[0] == datetime(
        2020, 4, 1, tzinfo=UTC
    ).timestamp()


def test_neither_layout_names_both(tmp_path):
    path = write(tmp_path, ["time,forecast,R", "2020-04-01 00:00:00+00:00,1,2"], "forecast.csv")
    message = assert_names(load_wide_error(path), path, 1)
    assert "request_time, forecast_time, <value>" in message and "ahead_5min" in message


def test_a_forecast_slice_keeps_whole_forecasts_issued_inside(tmp_path):
    forecast = load_forecast(ForecastSource(path=wide(tmp_path, wide_rows(6)), region="R"))
    start_s = forecast.request_s[2]
    part = forecast.slice(start_s, forecast.request_s[4])
    assert np.array_equal(part.request_s, forecast.request_s[2:4])
    assert part.offsets.tolist() == [0, 3, 6]
    assert np.array_equal(part.target_s, forecast.target_s[6:12])
    assert np.array_equal(part.ci_g_per_kwh, forecast.ci_g_per_kwh[6:12])
    assert part.latest(start_s - 1) is None and part.latest(start_s + 1)[1].tolist() == [102, 112, 122]
    assert len(forecast.slice(0, 1).request_s) == 0 and forecast.slice(0, 1).offsets.tolist() == [0]
