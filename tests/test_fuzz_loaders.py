"""Hostile input: the trace, forecast and config loaders under property-based fuzzing.

A valid trace (the three real layouts: wide with offsets, single-region naive, average-CI
renamed), forecast or experiment is generated, then one mutation is applied. Benign ones (CRLF,
BOM, gzip, padded cells, the same instant written with another offset) must load to exactly the
original data; defects must raise :class:`TraceError` / :class:`ConfigError` naming the file, the
line or key, and the fix — never another exception type, never a silent acceptance. Random bytes
and truncated files must do one or the other. Planted credentials never reach an error message.
"""

from __future__ import annotations

import gzip
import math
import string
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planning_fixtures import PAPER_TOML, REPO, TRACES

from curtail.config import (
    POLICY_KINDS,
    ConfigError,
    ForecastSource,
    TraceSource,
    load_experiment,
    parse_experiment,
)
from curtail.planning.traces import MAX_PLAUSIBLE_G_PER_KWH, TraceError, load_forecast, load_trace

FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
STEP_S = 300


def fuzz(examples: int):
    return settings(FUZZ, max_examples=examples)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# =============================================================================================
# Traces


@dataclass
class Trace:
    """A generated trace in one of the real layouts, as cells (header + rows) and as data."""

    layout: str  # "wide" (offsets), "single" (naive), "average" (naive, renamed column)
    header: list[str]
    rows: list[list[str]]
    times_s: np.ndarray
    values: dict[str, np.ndarray]  # region -> gCO2/kWh
    source: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [",".join(self.header), *(",".join(row) for row in self.rows)]

    def text(self) -> str:
        return "\n".join(self.lines()) + "\n"


def stamp(t_s: float, offset: str | None) -> str:
    """``offset`` None: naive UTC; else e.g. "+00:00", "+05:30", "-08:00", "Z"."""
    if offset is None or offset == "Z":
        text = datetime.fromtimestamp(t_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
        return text + (offset or "")
    sign = 1 if offset[0] == "+" else -1
    zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[-2:])))
    return datetime.fromtimestamp(t_s, zone).strftime("%Y-%m-%d %H:%M:%S") + offset


VALUE = st.floats(0, MAX_PLAUSIBLE_G_PER_KWH, allow_nan=False) | st.integers(0, 1500).map(float)


@st.composite
def traces(draw, min_rows: int = 1) -> Trace:
    layout = draw(st.sampled_from(["wide", "single", "average"]))
    n = draw(st.integers(min_rows, 40))
    start_s = float(
        draw(st.integers(946_684_800 // STEP_S, 4_102_444_800 // STEP_S)) * STEP_S
    )  # 2000..2100
    times_s = start_s + STEP_S * np.arange(n, dtype=float)
    if layout == "wide":
        regions = draw(
            st.lists(
                st.sampled_from(["CAISO_NORTH", "SPP_TX", "NEM_SA", "DE"]),
                min_size=1,
                max_size=4,
                unique=True,
            )
        )
        header, offset = ["point_time", *regions], "+00:00"
        source = {}
    elif layout == "single":
        regions = ["Caiso_North"]
        header, offset, source = ["time", "Caiso_North"], None, {"naive_timezone": "UTC"}
    else:
        regions = ["DE_AVG"]
        header, offset = ["Time", "Carbon Intensity"], None
        source = {
            "naive_timezone": "UTC",
            "signal": "average",
            "columns": {"Carbon Intensity": "DE_AVG"},
        }
    values = {r: np.array(draw(st.lists(VALUE, min_size=n, max_size=n))) for r in regions}
    rows = [
        [stamp(t, offset), *(repr(float(values[r][i])) for r in regions)]
        for i, t in enumerate(times_s)
    ]
    return Trace(layout, header, rows, times_s, values, {"max_gap_s": 3600.0, **source})


@dataclass
class Mutated:
    data: bytes
    expect: tuple[int | None, str] | None  # None: benign; else (line or None, words in the problem)
    name: str = "trace.csv"
    source: dict = field(default_factory=dict)  # overrides of the trace's source


def _encode(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _gzip(trace: Trace, draw) -> Mutated:
    return Mutated(gzip.compress(trace.text().encode()), None, name="trace.csv.gz")


def _crlf(trace: Trace, draw) -> Mutated:
    return Mutated(trace.text().replace("\n", "\r\n").encode(), None)


def _bom(trace: Trace, draw) -> Mutated:
    return Mutated(("\ufeff" + trace.text()).encode(), None)


def _padded_cells(trace: Trace, draw) -> Mutated:
    pad = draw(st.sampled_from([" ", "  ", "\t"]))
    return Mutated(
        _encode([",".join(pad + c + pad for c in line.split(",")) for line in trace.lines()]), None
    )


def _other_offset(trace: Trace, draw) -> Mutated:
    """The same instants written with another UTC offset on some rows (legal: DST files do it)."""
    if trace.layout != "wide":
        return _crlf(trace, draw)
    offsets = st.sampled_from(["+05:30", "-08:00", "Z", "+01:00", "-03:30"])
    rows = [
        [stamp(trace.times_s[i], draw(offsets)), *row[1:]] if draw(st.booleans()) else row
        for i, row in enumerate(trace.rows)
    ]
    return Mutated(_encode([",".join(trace.header), *(",".join(r) for r in rows)]), None)


BENIGN = [_gzip, _crlf, _bom, _padded_cells, _other_offset]


def _row(trace: Trace, draw, lowest: int = 0) -> int:
    return draw(st.integers(lowest, len(trace.rows) - 1), label="row")


def _bad_value(trace: Trace, draw) -> Mutated:
    i, column = _row(trace, draw), draw(st.integers(1, len(trace.header) - 1), label="column")
    cell, words = draw(
        st.sampled_from(
            [
                ("NaN", "missing"),
                ("nan", "missing"),
                ("", "missing"),
                ("abc", "non-numeric"),
                ("inf", "missing"),
                ("-inf", "missing"),
                ("1e400", "missing"),
                ("N/A", "missing"),
                ("12;5", "non-numeric"),
                ("-5", "negative"),
                ("-0.001", "negative"),
                ("4000", "above any real grid"),
                ("1e6", "above any real grid"),
            ]
        ),
        label="cell",
    )
    rows = [list(r) for r in trace.rows]
    rows[i][column] = cell
    return Mutated(_encode([",".join(trace.header), *(",".join(r) for r in rows)]), (i + 2, words))


def _gap(trace: Trace, draw) -> Mutated:
    i = draw(st.integers(1, len(trace.rows) - 2), label="dropped row")
    lines = trace.lines()
    del lines[i + 1]
    return Mutated(_encode(lines), (i + 2, "gap of 600 s"), source={"max_gap_s": float(STEP_S)})


def _duplicate(trace: Trace, draw) -> Mutated:
    i = _row(trace, draw, 1)
    rows = [list(r) for r in trace.rows]
    rows[i][0] = rows[i - 1][0]
    return Mutated(
        _encode([",".join(trace.header), *(",".join(r) for r in rows)]),
        (i + 2, "duplicate timestamp"),
    )


def _swap(trace: Trace, draw) -> Mutated:
    i = _row(trace, draw, 1)
    lines = trace.lines()
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return Mutated(_encode(lines), (i + 2, "out-of-order timestamp"))


def _bad_time(trace: Trace, draw) -> Mutated:
    i = _row(trace, draw)
    cell = draw(
        st.sampled_from(
            [
                "yesterday",
                "",
                "2026-02-30 00:00:00",
                "2026-01-11 25:00:00",
                "17:00",
                "9999-12-31 23:55:00",
                "1066-10-14 09:00:00",
                "2026-01-11 17:00:00 PST",
                "1768150800",
            ]
        )
    )
    rows = [list(r) for r in trace.rows]
    rows[i][0] = cell + (
        "+00:00" if trace.layout == "wide" and cell and cell[0] in "129" and ":" in cell else ""
    )
    words = "outside 1900..2200" if cell.startswith("9999") else "timestamp"
    return Mutated(_encode([",".join(trace.header), *(",".join(r) for r in rows)]), (i + 2, words))


def _mixed_zone(trace: Trace, draw) -> Mutated:
    """One row written unlike the others: naive among offsets, or with an offset among naive."""
    i = _row(trace, draw)
    rows = [list(r) for r in trace.rows]
    rows[i][0] = (
        rows[i][0].removesuffix("+00:00") if trace.layout == "wide" else rows[i][0] + "+00:00"
    )
    return Mutated(
        _encode([",".join(trace.header), *(",".join(r) for r in rows)]), (i + 2, "mixes timestamps")
    )


def _no_zone(trace: Trace, draw) -> Mutated:
    if trace.layout == "wide":
        rows = [[r[0].removesuffix("+00:00"), *r[1:]] for r in trace.rows]
        return Mutated(
            _encode([",".join(trace.header), *(",".join(r) for r in rows)]), (2, "no time zone")
        )
    return Mutated(trace.text().encode(), (2, "no time zone"), source={"naive_timezone": None})


def _extra_field(trace: Trace, draw) -> Mutated:
    i = _row(trace, draw)
    lines = trace.lines()
    lines[i + 1] += "," + draw(st.sampled_from(["", "5", "extra"]))
    return Mutated(_encode(lines), (i + 2, "fields"))


def _missing_field(trace: Trace, draw) -> Mutated:
    i = _row(trace, draw)
    lines = trace.lines()
    lines[i + 1] = lines[i + 1].rsplit(",", 1)[0]
    return Mutated(_encode(lines), (i + 2, "missing or non-numeric value ''"))


def _truncated_line(trace: Trace, draw) -> Mutated:
    """A line cut anywhere before its last comma (a cut inside the last value can be a valid number)."""
    i = _row(trace, draw)
    lines = trace.lines()
    cut = draw(st.integers(0, lines[i + 1].rindex(",")), label="cut")
    lines[i + 1] = lines[i + 1][:cut]
    return Mutated(
        _encode(lines), (-1, "")
    )  # -1: some data line, which depends on what the cut left


def _no_header(trace: Trace, draw) -> Mutated:
    return Mutated(_encode(trace.lines()[1:]), (1, "looks like data"))


def _header_defect(trace: Trace, draw) -> Mutated:
    header = list(trace.header)
    column = draw(st.integers(1, len(header) - 1), label="column")
    kind = draw(st.sampled_from(["blank", "twice", "lbs", "tonnes"]))
    if kind == "blank":
        header[column], words = draw(st.sampled_from(["", " "])), "has no name"
    elif kind == "twice":
        header[column], words = header[column - 1], "appears twice"
    else:
        unit = {
            "lbs": draw(st.sampled_from(["lbs/MWh", "lbs_per_mwh", "lb CO2/MWh"])),
            "tonnes": "tCO2/MWh",
        }[kind]
        header[column] = f"{header[column]} ({unit})"
        words = "declares unit"
    if trace.layout == "average" and kind != "twice":
        return Mutated(
            _encode([",".join(header), *trace.lines()[1:]]), (None, "")
        )  # `columns` no longer matches
    return Mutated(_encode([",".join(header), *trace.lines()[1:]]), (1, words))


def _units_column(trace: Trace, draw) -> Mutated:
    lines = [
        trace.lines()[0] + ",units",
        *(line + ",lbs_co2_per_mwh" for line in trace.lines()[1:]),
    ]
    return Mutated(_encode(lines), (1, "holds units"))


def _declared_lbs(trace: Trace, draw) -> Mutated:
    """A g/kWh file declared as lbs/MWh loads (× 0.453592): the check below expects exactly that."""
    return Mutated(trace.text().encode(), None, source={"unit": "lbs_per_mwh"})


def _not_utf8(trace: Trace, draw) -> Mutated:
    data = trace.text().encode()
    at = draw(st.integers(0, len(data)), label="at")
    return Mutated(
        data[:at] + draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\x80"])) + data[at:],
        (None, "UTF-8"),
    )


def _open_quote(trace: Trace, draw) -> Mutated:
    i = _row(trace, draw)
    lines = trace.lines()
    lines[i + 1] = '"' + lines[i + 1]
    return Mutated(_encode(lines), (-1, ""))


def _empty(trace: Trace, draw) -> Mutated:
    data, words = draw(
        st.sampled_from(
            [(b"", "empty"), ((",".join(trace.header) + "\n").encode(), "no data rows")]
        )
    )
    return Mutated(data, (None, words))


def _corrupt_gzip(trace: Trace, draw) -> Mutated:
    data = gzip.compress(trace.text().encode())
    return Mutated(data[: draw(st.integers(0, len(data) - 9))], (None, ""), name="trace.csv.gz")


DEFECTS = [
    _bad_value,
    _gap,
    _duplicate,
    _swap,
    _bad_time,
    _mixed_zone,
    _no_zone,
    _extra_field,
    _missing_field,
    _truncated_line,
    _no_header,
    _header_defect,
    _units_column,
    _not_utf8,
    _open_quote,
    _empty,
    _corrupt_gzip,
]
NEEDS_ROWS = {_gap: 3, _duplicate: 2, _swap: 2, _mixed_zone: 3}


def write_bytes(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def assert_trace_error(
    error: TraceError, path: Path, line: int | None, words: str, rows: int
) -> None:
    """Names the file and (where one is meant) the line, says what is wrong and what to do."""
    message = str(error)
    assert message.startswith(str(path)), message
    assert ". Fix: " in message and len(message.split(". Fix: ", 1)[1]) > 10, message
    assert words in message, (words, message)
    if line == -1:
        assert error.line is not None and 1 <= error.line <= rows + 2, message
    elif line is not None:
        assert error.line == line, message
        assert message.startswith(f"{path}, line {line}: "), message


def assert_valid(loaded, trace: Trace, unit_factor: float = 1.0) -> None:
    """Exactly the generated data: sorted unique UTC instants, finite gCO2/kWh, each region."""
    assert sorted(loaded.signals) == sorted(trace.values)
    for region, signal in loaded.signals.items():
        assert np.all(np.diff(signal.times_s) > 0) and np.all(np.isfinite(signal.ci_g_per_kwh))
        np.testing.assert_array_equal(signal.times_s, trace.times_s)
        np.testing.assert_array_equal(signal.ci_g_per_kwh, trace.values[region] * unit_factor)
        assert signal.kind == ("average" if trace.layout == "average" else "marginal")


@fuzz(60)
@given(trace=traces(), data=st.data())
def test_benign_variations_load_to_the_same_trace(workdir, trace, data):
    mutation = data.draw(st.sampled_from([*BENIGN, _declared_lbs]), label="mutation")
    mutated = mutation(trace, data.draw)
    path = write_bytes(workdir, mutated.name, mutated.data)
    loaded = load_trace(TraceSource(path=path, **{**trace.source, **mutated.source}))
    assert_valid(loaded, trace, 0.453592 if mutation is _declared_lbs else 1.0)


@fuzz(250)
@given(trace=traces(), data=st.data())
def test_every_defect_is_a_trace_error_naming_file_line_and_fix(workdir, trace, data):
    usable = [m for m in DEFECTS if len(trace.rows) >= NEEDS_ROWS.get(m, 1)]
    mutation = data.draw(st.sampled_from(usable), label="mutation")
    mutated = mutation(trace, data.draw)
    path = write_bytes(workdir, mutated.name, mutated.data)
    with pytest.raises(TraceError) as info:
        load_trace(TraceSource(path=path, **{**trace.source, **mutated.source}))
    line, words = mutated.expect
    assert_trace_error(info.value, path, line, words, len(trace.rows))


def check_loaded_or_trace_error(load, path: Path) -> None:
    """Hostile bytes either load to a usable trace or raise a TraceError naming the file."""
    try:
        loaded = load()
    except TraceError as error:
        assert str(error).startswith(str(path)) and ". Fix: " in str(error), str(error)
        return
    for signal in loaded.signals.values():
        assert np.all(np.diff(signal.times_s) > 0) and np.all(np.isfinite(signal.times_s))
        assert np.all(np.isfinite(signal.ci_g_per_kwh)) and np.all(signal.ci_g_per_kwh >= 0)
        assert np.all(signal.ci_g_per_kwh <= MAX_PLAUSIBLE_G_PER_KWH)


@fuzz(60)
@given(trace=traces(), data=st.data())
def test_a_truncated_file_is_a_prefix_or_a_trace_error(workdir, trace, data):
    """A file cut anywhere: a cut at a line end (or inside the last value) leaves a valid,
    shorter trace, which must be exactly a prefix of the original; any other cut is a TraceError."""
    text = trace.text().encode()
    name, end = "cut.csv", data.draw(st.integers(0, len(text) - 1), label="end")
    path = write_bytes(workdir, name, text[:end])
    try:
        loaded = load_trace(TraceSource(path=path, **trace.source))
    except TraceError as error:
        assert str(error).startswith(str(path)) and ". Fix: " in str(error), str(error)
        return
    for region, signal in loaded.signals.items():
        rows = len(signal.times_s)
        np.testing.assert_array_equal(signal.times_s, trace.times_s[:rows])
        np.testing.assert_array_equal(signal.ci_g_per_kwh[:-1], trace.values[region][: rows - 1])


CSV_ALPHABET = st.sampled_from(
    list('0123456789-:+ ,.\n\r"TZe') + ["nan", "inf", "time", "R", "\ufeff", "\xe9"]
)


@fuzz(120)
@given(trace=traces(), data=st.data())
def test_spliced_garbage_never_escapes_as_another_exception(workdir, trace, data):
    """Random text or bytes spliced into a valid file anywhere (the header included)."""
    text = trace.text().encode()
    start = data.draw(st.integers(0, len(text)), label="start")
    stop = data.draw(st.integers(start, min(len(text), start + 40)), label="stop")
    garbage = data.draw(
        st.binary(max_size=20)
        | st.lists(CSV_ALPHABET, max_size=12).map(lambda s: "".join(s).encode())
    )
    path = write_bytes(workdir, "garbage.csv", text[:start] + garbage + text[stop:])
    check_loaded_or_trace_error(lambda: load_trace(TraceSource(path=path, **trace.source)), path)


@fuzz(60)
@given(
    data=st.binary(max_size=200)
    | st.text('0123456789-:+ ,.\n\r"TZe\ufeff\xe9' + string.printable, max_size=200).map(
        str.encode
    ),
    naive=st.sampled_from([None, "UTC"]),
)
def test_random_files_never_escape_as_another_exception(workdir, data, naive):
    path = write_bytes(workdir, "random.csv", data)
    check_loaded_or_trace_error(
        lambda: load_trace(TraceSource(path=path, naive_timezone=naive)), path
    )


def test_a_row_of_extra_fields_no_longer_shifts_the_columns(tmp_path):
    """Regression: pandas used the time column as the index when a data row had one field more
    than the header, so the values were read as timestamps ("cannot read timestamp '200'")."""
    path = write_bytes(
        tmp_path, "t.csv", b"time,R\n2026-01-11T17:00Z,200,5\n2026-01-11T17:05Z,210,5\n"
    )
    with pytest.raises(TraceError) as info:
        load_trace(TraceSource(path=path))
    assert_trace_error(info.value, path, 2, "Expected 2 fields in line 2, saw 3", 2)


def test_two_columns_renamed_to_one_region_are_refused(tmp_path):
    path = write_bytes(tmp_path, "t.csv", b"time,A,R\n2026-01-11T17:00Z,200,5\n")
    with pytest.raises(TraceError, match="several columns would become region 'R'"):
        load_trace(TraceSource(path=path, columns={"A": "R"}))


@pytest.mark.parametrize("name", sorted(p.name for p in TRACES.glob("*.csv")))
def test_real_traces_pass_the_header_checks(name):
    source = TraceSource(path=TRACES / name, naive_timezone="UTC", max_gap_s=86400)
    assert load_trace(source).signals


# ---------------------------------------------------------------------------------- forecasts


@st.composite
def forecasts(draw) -> tuple[list[list[str]], int]:
    requests = draw(st.integers(1, 8))
    horizon = draw(st.integers(1, 6))
    start_s = float(draw(st.integers(1_600_000_000 // STEP_S, 1_900_000_000 // STEP_S)) * STEP_S)
    offset = draw(st.sampled_from([None, "+00:00"]))
    rows = [
        [
            stamp(start_s + STEP_S * r, offset),
            stamp(start_s + STEP_S * (r + h + 1), offset),
            repr(draw(VALUE)),
        ]
        for r in range(requests)
        for h in range(horizon)
    ]
    return rows, horizon


FORECAST_HEADER = "request_time,forecast_time,Caiso_North"


@fuzz(120)
@given(forecast=forecasts(), data=st.data())
def test_forecast_defects_are_trace_errors(workdir, forecast, data):
    rows, horizon = forecast
    kinds = [
        "benign_crlf",
        "benign_gzip",
        "value",
        "extra",
        "empty",
        "header_only",
        "unit",
        "garbage",
        "columns",
    ]
    kinds += ["duplicate", "swap"] if len(rows) >= 2 else []
    kind = data.draw(st.sampled_from(kinds), label="kind")
    lines = [FORECAST_HEADER, *(",".join(r) for r in rows)]
    name, expect = "forecast.csv", None
    i = data.draw(
        st.integers(1 if kind in ("duplicate", "swap") else 0, len(rows) - 1), label="row"
    )
    if kind == "value":
        lines[i + 1] = (
            lines[i + 1].rsplit(",", 1)[0]
            + ","
            + data.draw(st.sampled_from(["", "nan", "-1", "x", "1e9"]))
        )
        expect = (i + 2, "")
    elif kind == "extra":
        lines[i + 1] += ",5"
        expect = (i + 2, "fields")
    elif kind == "duplicate":
        lines[i + 1] = lines[i]
        expect = (i + 2, "appears twice")
    elif kind == "swap":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        expect = (i + 1, "not sorted")  # the first row out of place
    elif kind in ("empty", "header_only"):
        lines = [] if kind == "empty" else [FORECAST_HEADER]
        expect = (None, "empty" if kind == "empty" else "no data rows")
    elif kind == "unit":
        lines[0] = FORECAST_HEADER + "_lbs_per_mwh"
        expect = (1, "declares unit")
    elif kind == "columns":
        lines = [line.rsplit(",", 1)[0] for line in lines]
        expect = (None, "are not request_time, forecast_time, <value>")
    text = "\n".join(lines) + ("\n" if lines else "")
    if kind == "benign_crlf":
        text = text.replace("\n", "\r\n")
    data_bytes = text.encode()
    if kind == "benign_gzip":
        name, data_bytes = "forecast.csv.gz", gzip.compress(data_bytes)
    if kind == "garbage":
        at = data.draw(st.integers(0, len(data_bytes)), label="at")
        data_bytes = (
            data_bytes[:at]
            + data.draw(st.binary(min_size=1, max_size=12), label="garbage")
            + data_bytes[at + 3 :]
        )
    path = write_bytes(workdir, name, data_bytes)
    source = ForecastSource(path=path, region="R", naive_timezone="UTC")
    if kind == "garbage":
        try:
            forecast_loaded = load_forecast(source)
        except TraceError as error:
            assert str(error).startswith(str(path)) and ". Fix: " in str(error)
        else:
            assert np.all(np.diff(forecast_loaded.request_s) > 0) and np.all(
                np.isfinite(forecast_loaded.ci_g_per_kwh)
            )
        return
    if expect is None:
        loaded = load_forecast(source)
        assert len(loaded.target_s) == len(rows) and len(loaded.request_s) == len(rows) // horizon
        return
    with pytest.raises(TraceError) as info:
        load_forecast(source)
    line, words = expect
    message = str(info.value)
    assert message.startswith(str(path)) and ". Fix: " in message and words in message, message
    if line is not None:
        assert info.value.line == line, message


# =============================================================================================
# Configs

PAPER_TRACE = str(TRACES / "watttime_moer_2026-01-11_4regions.csv")
REGIONS = ["CAISO_NORTH", "SPP_TX", "NEM_SA", "DE"]
POSITIVE = st.floats(1.0, 1e5, allow_nan=False)
NONNEG = st.floats(0.0, 1e4, allow_nan=False)


@st.composite
def policies(draw) -> dict:
    kind = draw(st.sampled_from(POLICY_KINDS))
    policy: dict = {"kind": kind}
    if kind in ("forecast", "budget"):
        for key in draw(
            st.lists(
                st.sampled_from(["lead_s", "min_window_s", "bridge_s", "hold_s"]),
                unique=True,
                max_size=3,
            )
        ):
            policy[key] = draw(NONNEG)
    if kind == "budget" and draw(st.booleans()):
        policy["max_ci_g_per_kwh"] = draw(NONNEG)
    return policy


@st.composite
def experiments(draw) -> dict:
    names = draw(st.lists(st.sampled_from(REGIONS), min_size=1, max_size=4, unique=True))
    sites = {}
    for region in names:
        site: dict = {
            "region": region,
            "tokens_per_s": draw(POSITIVE),
            "num_gpus": draw(st.integers(1, 8)),
        }
        if draw(st.booleans()):
            site |= {"training_power_w": draw(POSITIVE), "idle_power_w": draw(NONNEG)}
        else:
            site |= {
                "training_power_per_gpu_w": draw(POSITIVE),
                "idle_power_per_gpu_w": draw(NONNEG),
            }
        sites[region.lower()] = site
    round_s = draw(st.floats(60, 3600))
    execution = {
        "round_s": round_s,
        "sync_s": draw(NONNEG),
        "round_restart_s": draw(st.floats(0, 59)),
        "join": draw(st.sampled_from(["immediate", "next_round"])),
    }
    rules = {
        "threshold_g_per_kwh": draw(st.floats(0, 500)),
        "hysteresis_s": draw(NONNEG),
        "provisioning_s": draw(NONNEG),
        "poll_s": draw(st.floats(1, 60)),
    }
    runs = []
    for index in range(draw(st.integers(1, 3))):
        run: dict = {
            "name": f"run-{index}",
            "policy": draw(policies()),
            "sites": draw(st.lists(st.sampled_from(sorted(sites)), min_size=1, unique=True)),
        }
        if draw(st.booleans()):
            run["start"] = datetime(2026, 1, 11, 17, tzinfo=UTC)
            run["deadline"] = run["start"] + timedelta(hours=draw(st.integers(1, 18)))
        if draw(st.booleans()):
            run["execution"] = {"sync_s": draw(NONNEG)}
        if draw(st.booleans()):
            run["rules"] = {"provisioning_s": draw(NONNEG)}
        runs.append(run)
    return {
        "name": "fuzz",
        "token_budget": draw(st.floats(1e3, 1e12)),
        "traces": [{"path": PAPER_TRACE}],
        "rules": rules,
        "execution": execution,
        "sites": sites,
        "runs": runs,
    }


def rejected(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_experiment(data, source="fuzz.toml", base_dir=REPO)
    message = str(info.value)
    assert message.startswith("fuzz.toml: invalid config\n"), message
    return message


def line_naming(message: str, path: str) -> str:
    """The message line about ``path`` (a dotted key path)."""
    found = [line for line in message.splitlines() if line.strip().startswith(path + ":")]
    assert found, (path, message)
    return found[0]


def dict_nodes(data: dict, path: tuple = ()) -> list[tuple]:
    """Paths of the config tables where a key can be misspelled (not the name-keyed `sites`)."""
    nodes = [path]
    for key, value in data.items():
        if isinstance(value, dict) and key != "sites":
            nodes += dict_nodes(value, (*path, key))
        elif key == "sites" and isinstance(value, dict):
            nodes += [(*path, key, name) for name in value]
        elif isinstance(value, list):
            nodes += [
                n
                for i, v in enumerate(value)
                if isinstance(v, dict)
                for n in dict_nodes(v, (*path, key, i))
            ]
    return nodes


def at(data: dict, path: tuple):
    for part in path:
        data = data[part]
    return data


def error_path(data: dict, path: tuple) -> str:
    """How pydantic names ``path``: a policy's loc carries its kind (the union's tag)."""
    parts = list(path)
    if "policy" in parts:
        index = parts.index("policy")
        parts.insert(index + 1, at(data, tuple(path[: index + 1]))["kind"])
    return ".".join(str(p) for p in parts)


@fuzz(60)
@given(config=experiments())
def test_generated_experiments_are_valid(config):
    experiment = parse_experiment(config, source="fuzz.toml", base_dir=REPO)
    assert [r.name for r in experiment.runs] == [r["name"] for r in config["runs"]]


@fuzz(120)
@given(config=experiments(), data=st.data())
def test_unknown_keys_are_named_with_their_path_and_a_suggestion(config, data):
    path = data.draw(st.sampled_from(dict_nodes(config)), label="table")
    table = at(config, path)
    known = sorted(k for k in table if k != "kind")
    typo_of = (
        data.draw(st.sampled_from(known), label="misspelled")
        if known and data.draw(st.booleans())
        else None
    )
    if typo_of is not None:
        key = data.draw(
            st.sampled_from([typo_of + "x", typo_of[:-1], typo_of.upper()]), label="key"
        )
    else:
        key = data.draw(st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True), label="key")
    if key in table or (typo_of is None and known and key in (k.lower() for k in known)):
        return  # not unknown after all
    table[key] = data.draw(st.integers() | st.text(max_size=5) | st.booleans(), label="value")
    named = error_path(config, (*path, key))
    line = line_naming(rejected(config), named)
    assert "unknown key" in line and "remove it or fix its name" in line, line
    if typo_of is not None and typo_of.upper() != key:
        assert f"did you mean {typo_of!r}?" in line, line


DURATIONS = [
    ("rules", "hysteresis_s"),
    ("rules", "provisioning_s"),
    ("rules", "poll_s"),
    ("execution", "round_s"),
    ("execution", "sync_s"),
    ("execution", "round_restart_s"),
    ("execution", "group_start_s"),
    ("traces", 0, "max_gap_s"),
    ("rules", "percentile_window_s"),
    ("token_budget",),
]


def numeric_leaves(config: dict) -> list[tuple]:
    leaves = [p for p in DURATIONS if len(p) == 1 or p[0] in config]
    for name, site in config["sites"].items():
        leaves += [
            ("sites", name, key) for key, value in site.items() if isinstance(value, float | int)
        ]
    for index, run in enumerate(config["runs"]):
        leaves += [("runs", index, "policy", key) for key in run["policy"] if key != "kind"]
        for section in ("rules", "execution"):
            leaves += [("runs", index, section, key) for key in run.get(section, {})]
    return leaves


def put(config: dict, path: tuple, value) -> None:
    at(config, path[:-1])[path[-1]] = value


@fuzz(150)
@given(config=experiments(), data=st.data())
def test_bad_numbers_are_named_by_key(config, data):
    path = data.draw(st.sampled_from(numeric_leaves(config)), label="leaf")
    key = path[-1]
    may_be_zero = key in (
        "sync_s",
        "round_restart_s",
        "group_start_s",
        "hysteresis_s",
        "provisioning_s",
        "idle_power_w",
        "idle_power_per_gpu_w",
        "lead_s",
        "min_window_s",
        "bridge_s",
        "hold_s",
        "max_ci_g_per_kwh",
    )
    bad = [math.nan, math.inf, -math.inf, -1.0, -1e-9, "abc", [1], {"value": 1}] + (
        [] if may_be_zero else [0]
    )
    value = data.draw(st.sampled_from(bad), label="value")
    put(config, path, value)
    message = rejected(config)
    line = line_naming(message, error_path(config, path))
    if isinstance(value, float) and not math.isfinite(value):
        assert "finite number" in line, line


CROSS_FIELD = {
    "deadline before start": (
        lambda c: c["runs"][0].update(
            start=datetime(2026, 1, 12, tzinfo=UTC),
            deadline=datetime(2026, 1, 11, 18, tzinfo=UTC),
        ),
        "runs.0: Value error, deadline (2026-01-11T18:00:00+00:00) must be after start",
    ),
    "naive start": (
        lambda c: c["runs"][0].update(start=datetime(2026, 1, 11, 18)),
        "runs.0.start: ",
    ),
    "unknown site": (
        lambda c: c["runs"][0]["sites"].append("mars"),
        "uses sites ['mars'] that are not defined",
    ),
    "no sites": (lambda c: c.update(sites={}), "sites: Dictionary should have at least 1 item"),
    "run without sites": (
        lambda c: c["runs"][0].update(sites=[]),
        "runs.0.sites: List should have at least 1 item",
    ),
    "no runs": (lambda c: c.update(runs=[]), "runs: List should have at least 1 item"),
    "no traces": (lambda c: c.update(traces=[]), "give at least one [[traces]] file, or a [live] source"),
    "site twice": (
        lambda c: c["runs"][0].update(sites=c["runs"][0]["sites"] * 2),
        "runs.0.sites: Value error, sites listed twice",
    ),
    "run names": (lambda c: c["runs"].append(dict(c["runs"][0])), "run names must be unique"),
    "restart >= round": (
        lambda c: c["execution"].update(round_restart_s=c["execution"]["round_s"]),
        "must be shorter than round_s",
    ),
    "both power specs": (
        lambda c: next(iter(c["sites"].values())).update(
            training_power_w=1.0,
            training_power_per_gpu_w=1.0,
            idle_power_w=1.0,
            idle_power_per_gpu_w=1.0,
        ),
        "not both",
    ),
    "unknown policy": (
        lambda c: c["runs"][0]["policy"].update(kind="thresh"),
        "runs.0.policy: Input tag 'thresh'",
    ),
    "unknown unit": (
        lambda c: c["traces"][0].update(unit="kg_per_mwh"),
        "traces.0.unit: Input should be 'g_per_kwh' or 'lbs_per_mwh'",
    ),
    "path not a string": (lambda c: c["traces"][0].update(path=5), "traces.0.path: "),
    "rules not a table": (
        lambda c: c.update(rules="strict") or c["runs"][0].update(rules={"poll_s": 5}),
        "rules: Input should be a valid dictionary",
    ),
    "execution none": (
        lambda c: c.update(execution=None) or c["runs"][0].update(execution={"sync_s": 5}),
        "execution: Input should be a valid dictionary",
    ),
    "corpus not strings": (lambda c: c.update(training={"corpus": [5]}), "training.corpus.0: "),
    "percentile 100": (
        lambda c: c["rules"].update(threshold_percentile=100),
        "rules.threshold_percentile: Input should be less than 100",
    ),
    "budget zero": (
        lambda c: c.update(token_budget=0),
        "token_budget: Input should be greater than 0",
    ),
}


@fuzz(100)
@given(config=experiments(), case=st.sampled_from(sorted(CROSS_FIELD)))
def test_inconsistent_experiments_are_refused_by_key(config, case):
    mutate, named = CROSS_FIELD[case]
    mutate(config)
    assert named in rejected(config)


def test_a_config_that_is_not_a_table_is_a_config_error():
    for data in ([1, 2], "name = 'x'", None, 5):
        with pytest.raises(ConfigError, match="Input should be a valid dictionary"):
            parse_experiment(data, source="fuzz.toml", base_dir=REPO)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- TOML text


def paper_text() -> str:
    return PAPER_TOML.read_text().replace("../data", str(REPO / "data"))


@fuzz(100)
@given(data=st.data())
def test_broken_toml_is_a_config_error_naming_the_file(workdir, data):
    """Truncated, spliced or random TOML: loads, or ConfigError starting with the file name."""
    text = paper_text().encode()
    kind = data.draw(
        st.sampled_from(["truncate", "splice", "random", "deep", "digits"]), label="kind"
    )
    if kind == "truncate":
        broken = text[: data.draw(st.integers(0, len(text)), label="end")]
    elif kind == "splice":
        at_ = data.draw(st.integers(0, len(text)), label="at")
        broken = (
            text[:at_]
            + data.draw(st.binary(min_size=1, max_size=16), label="garbage")
            + text[at_ + 2 :]
        )
    elif kind == "random":
        broken = data.draw(
            st.binary(max_size=300) | st.text(max_size=300).map(str.encode), label="file"
        )
    elif kind == "deep":
        depth = data.draw(st.integers(500, 3000), label="depth")
        broken = b"seed = " + b"[" * depth + b"]" * depth + b"\n" + text
    else:
        broken = (
            b"seed = " + b"7" * data.draw(st.integers(4301, 6000), label="digits") + b"\n" + text
        )
    path = write_bytes(workdir, "experiment.toml", broken)
    try:
        load_experiment(path)
    except ConfigError as error:
        assert str(error).startswith(f"{path}: "), str(error)


def test_toml_typo_suggests_the_field(tmp_path):
    text = paper_text().replace("hysteresis_s = 600", "hysterisis_s = 600")
    path = write_bytes(tmp_path, "experiment.toml", text.encode())
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert (
        f"{path}: invalid config\n  rules.hysterisis_s: unknown key (typo or renamed field?); did you mean 'hysteresis_s'?"
        in str(info.value)
    )
    assert str(info.value).count("hysterisis_s") == 1  # not once more per run that overrides rules


# ---------------------------------------------------------------------------------- credentials

SECRET = "planted-Secret-3c9e1f"


@fuzz(80)
@given(config=experiments(), data=st.data())
def test_planted_credentials_never_appear_in_config_errors(config, data):
    """A password or token pasted into a config (a stray key, a wrong field, a bad value) is
    refused without echoing it: credentials come only from the environment."""
    where = data.draw(
        st.sampled_from(["stray key", "typed field", "literal", "nested", "datetime", "path list"]),
        label="where",
    )
    site = next(iter(config["sites"]))
    if where == "stray key":
        table = at(config, data.draw(st.sampled_from(dict_nodes(config)), label="table"))
        table[
            data.draw(
                st.sampled_from(
                    ["watttime_password", "WATTTIME_PASSWORD", "electricitymaps_token", "api_key"]
                )
            )
        ] = SECRET
    elif where == "typed field":
        config["sites"][site]["tokens_per_s"] = SECRET
    elif where == "literal":
        config["traces"][0]["unit"] = SECRET
    elif where == "nested":
        config["sites"][site]["region"] = {"password": SECRET}
    elif where == "datetime":
        config["runs"][0]["start"] = SECRET
    else:
        config["training"] = {"corpus": [{"token": SECRET}]}
    message = rejected(config)
    assert SECRET not in message and SECRET.lower() not in message.lower()


def test_a_config_carrying_credentials_writes_no_run_directory(tmp_path, monkeypatch):
    """The simulated run never starts: nothing under output_dir, and the error has no secret.
    (Secrets in the *environment* during a simulated run: test_sources.py's planted-secret scan.)"""
    import curtail

    monkeypatch.setenv("WATTTIME_PASSWORD", SECRET)
    config = tomllib.loads(paper_text())
    config["traces"][0]["watttime_password"] = SECRET
    config["electricitymaps_api_key"] = SECRET
    with pytest.raises(ConfigError) as info:
        curtail.simulate(config, output_dir=tmp_path / "runs")
    assert SECRET not in str(info.value) and not (tmp_path / "runs").exists()
    assert "traces.0.watttime_password: unknown key" in str(info.value)
