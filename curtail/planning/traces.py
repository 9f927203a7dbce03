"""Load and validate carbon-intensity traces and forecasts into UTC signals in gCO2/kWh.

Every defect is reported at the edge with the file, the line and the remedy
(:class:`TraceError`): unparseable, naive-without-zone, mixed-zone, unsorted or duplicate
timestamps; NaN, negative or implausible values; gaps longer than allowed; regions that a
site needs but no trace has; a run span the trace does not cover. Unit conversion happens
here, once, by name (``lbs_per_mwh`` × 0.453592 → gCO2/kWh).

Recorded forecasts come in two layouts, both read by :func:`load_forecast`: WattTime's long
one (``request_time, forecast_time, <value>``: one row per forecast value) and a wide one
(``request_time, ahead_5min, ahead_10min, …``: one row per issued forecast, one column per
lead, as the SGIP MOER year in ``data/traces`` is stored).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from curtail.config import ForecastSource, TraceSource
from curtail.planning.signals import Signal, iso

LBS_PER_MWH_TO_G_PER_KWH = 0.453592
"""1 lb/MWh = 453.592 g / 1000 kWh."""

MAX_PLAUSIBLE_G_PER_KWH = 1500.0
"""Above any real grid's (marginal) intensity; larger values usually mean lbs/MWh."""

_OFFSET = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")

_UNIT_IN_NAME = re.compile(r"(?<![a-z])(lbs?|kg|g|t)\s*(?:co2e?)?\s*(?:/|_per_|\s+per\s+)\s*(mwh|kwh)", re.IGNORECASE)
"""A unit written into a column name: lbs/MWh, lbs_per_mwh, gCO2/kWh, kg/MWh, t per MWh …"""
_GRAMS = {"lb": 453.592, "lbs": 453.592, "kg": 1000.0, "g": 1.0, "t": 1e6}
_KWH = {"kwh": 1.0, "mwh": 1000.0}

_LEAD_COLUMN = re.compile(r"ahead_(\d+)min")
"""A wide forecast file's lead column: ``ahead_<minutes>min``."""

EARLIEST_YEAR, LATEST_YEAR = 1900, 2200
"""Timestamps outside these years are typos (and beyond nanosecond datetimes near 2262)."""


class TraceError(ValueError):
    """A trace file is unusable; says which file, which line and what to do."""

    def __init__(self, path: str | Path, problem: str, remedy: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}. Fix: {remedy}")


def _line_of(row_index: int) -> int:
    """Data row i of a CSV with one header line sits on line i + 2."""
    return int(row_index) + 2


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_csv(path: Path) -> pd.DataFrame:
    """Read every cell as text; the header's names as written (no pandas renaming of
    duplicates or blanks), and a row with more fields than the header is an error, never a
    silently shifted index column."""
    if not path.is_file():
        raise TraceError(path, "no such file", "check the trace path (relative paths start at the config file)")
    try:
        raw = pd.read_csv(path, header=None, dtype=str, skip_blank_lines=False, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise TraceError(path, "the file is empty", "give a header line and at least one row") from None
    except pd.errors.ParserError as error:
        message = str(error).replace("Error tokenizing data. C error: ", "").strip()
        found = re.search(r"\bline (\d+)", message) or re.search(r"\brow (\d+)", message)
        line = None if found is None else int(found.group(1)) + (found.group(0).startswith("row"))
        raise TraceError(
            path,
            f"not a readable CSV ({message})",
            "close every quote and give every row as many comma-separated fields as the header",
            line,
        ) from None
    except UnicodeDecodeError as error:
        raise TraceError(path, f"not UTF-8 text ({error})", "export it as comma-separated UTF-8 text") from None
    except (OSError, EOFError, zlib.error) as error:  # a corrupt or truncated .gz and the like
        raise TraceError(path, f"cannot read the file ({error})", "export it again (gzip is optional)") from None
    names = [str(name).strip() for name in raw.iloc[0]]
    # a missing header first: its data row may also repeat a value or leave a cell empty
    if names[0] and not pd.isna(pd.to_datetime(names[0], errors="coerce", format="ISO8601")):
        raise TraceError(
            path, f"the first line looks like data ({names[0]!r}), not a header", "add a header line, e.g. time,REGION", 1
        )
    for index, name in enumerate(names):
        if not name:
            raise TraceError(path, f"column {index + 1} has no name", "name every column in the header", 1)
        if name in names[:index]:
            raise TraceError(path, f"column {name!r} appears twice", "give every column its own name", 1)
    frame = raw.iloc[1:].reset_index(drop=True).fillna("")
    frame.columns = names
    if frame.shape[0] == 0:
        raise TraceError(path, "no data rows", "give a header line and at least one row")
    return frame


def _check_header(path: Path, value_columns: list[str], unit: str) -> None:
    """A column of unit names, or a column name that names a unit other than the declared one."""
    for column in value_columns:
        if column.lower() in ("unit", "units"):
            raise TraceError(
                path,
                f"column {column!r} holds units, not carbon intensity",
                "drop the column and declare the unit in the trace config (unit = 'g_per_kwh' or 'lbs_per_mwh')",
                1,
            )
        named = _UNIT_IN_NAME.search(column)
        if named is None:
            continue
        mass, energy = named.group(1).lower(), named.group(2).lower()
        factor = _GRAMS[mass] / _KWH[energy]  # × this gives gCO2/kWh
        declared = LBS_PER_MWH_TO_G_PER_KWH if unit == "lbs_per_mwh" else 1.0
        if not np.isclose(factor, declared):
            remedy = {
                LBS_PER_MWH_TO_G_PER_KWH: "declare unit = 'lbs_per_mwh' in the trace config",
                1.0: "declare unit = 'g_per_kwh' in the trace config",
            }.get(round(factor, 6), f"convert the column to gCO2/kWh (× {factor:g}) and rename it")
            raise TraceError(
                path,
                f"column {column!r} is in {named.group(0)!r}, but the trace config declares unit = {unit!r}",
                remedy,
                1,
            )


def _refuse_unreadable(path: Path, column: str, text: pd.Series, parsed: pd.Series) -> None:
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        raise TraceError(
            path,
            f"cannot read timestamp {text.iloc[bad[0]]!r} in column {column!r}",
            "use ISO-8601 timestamps such as 2026-01-11 17:00:00+00:00",
            _line_of(bad[0]),
        )


def parse_times_utc(path: Path, column: str, raw: pd.Series, naive_timezone: str | None) -> np.ndarray:
    """Parse a column of timestamps into UTC epoch seconds, with line-precise errors."""
    text = raw.astype(str).str.strip()
    # Unreadable cells first: otherwise "garbage" (no offset) among offset timestamps is
    # reported as a zone mix-up instead of what it is.
    readable = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    _refuse_unreadable(path, column, text, readable)
    has_offset = text.str.contains(_OFFSET)
    if has_offset.any() and not has_offset.all():
        # the odd one out is the first row written unlike the majority (not unlike row 1,
        # which may itself be the odd one)
        counts = has_offset.value_counts()
        usual = bool(has_offset.iloc[0]) if counts.get(True, 0) == counts.get(False, 0) else bool(counts.idxmax())
        odd = int(np.flatnonzero(has_offset.to_numpy() != usual)[0])
        raise TraceError(
            path,
            f"column {column!r} mixes timestamps with and without a UTC offset ({text.iloc[odd]!r})",
            "write every timestamp the same way, all with offsets (e.g. +00:00) or all without",
            _line_of(odd),
        )
    parsed = pd.to_datetime(text, errors="coerce", utc=bool(has_offset.all()), format="ISO8601")
    _refuse_unreadable(path, column, text, parsed)
    years = parsed.dt.year.to_numpy()
    outside = np.flatnonzero((years < EARLIEST_YEAR) | (years > LATEST_YEAR))
    if len(outside):
        raise TraceError(
            path,
            f"timestamp {text.iloc[outside[0]]!r} in column {column!r} is outside {EARLIEST_YEAR}..{LATEST_YEAR}",
            "check the year",
            _line_of(outside[0]),
        )
    if not has_offset.all():
        if naive_timezone is None:
            raise TraceError(
                path,
                f"timestamps in column {column!r} have no time zone ({text.iloc[0]!r})",
                "declare it in the trace config, e.g. naive_timezone = \"UTC\"",
                _line_of(0),
            )
        try:
            parsed = parsed.dt.tz_localize(naive_timezone, ambiguous="raise", nonexistent="raise")
        except Exception as error:  # noqa: BLE001 (zoneinfo, DST and name errors: KeyError, ValueError, IndexError, OSError)
            raise TraceError(
                path,
                f"cannot place naive timestamps in zone {naive_timezone!r} ({error})",
                "use an IANA zone name; for local-time files with DST, convert to UTC first",
            ) from None
    utc = parsed.dt.tz_convert("UTC")
    return utc.dt.as_unit("ns").astype("int64").to_numpy() / 1e9


def _check_order(path: Path, times_s: np.ndarray, max_gap_s: float | None) -> None:
    steps = np.diff(times_s)
    back = np.flatnonzero(steps <= 0)
    if len(back):
        row = back[0] + 1
        kind = "duplicate" if steps[back[0]] == 0 else "out-of-order"
        raise TraceError(
            path,
            f"{kind} timestamp {iso(times_s[row])} (after {iso(times_s[row - 1])})",
            "sort the rows by time and keep one row per timestamp",
            _line_of(row),
        )
    if max_gap_s is not None:
        gaps = np.flatnonzero(steps > max_gap_s)
        if len(gaps):
            row = gaps[0] + 1
            raise TraceError(
                path,
                f"gap of {steps[gaps[0]]:.0f} s before {iso(times_s[row])} (max_gap_s = {max_gap_s:.0f})",
                "fill the gap in the source data, or raise max_gap_s in the trace config if the gap is acceptable",
                _line_of(row),
            )


def _parse_values(path: Path, column: str, raw: pd.Series, unit: str) -> np.ndarray:
    text = raw.astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise TraceError(
            path,
            f"missing or non-numeric value {text.iloc[bad[0]]!r} in column {column!r}",
            "fill or drop the row (curtail does not guess missing carbon intensity)",
            _line_of(bad[0]),
        )
    negative = np.flatnonzero(values < 0)
    if len(negative):
        raise TraceError(
            path,
            f"negative carbon intensity {values[negative[0]]} in column {column!r}",
            "carbon intensity is >= 0; check the source and its sign",
            _line_of(negative[0]),
        )
    if unit == "lbs_per_mwh":
        values = values * LBS_PER_MWH_TO_G_PER_KWH
    elif unit != "g_per_kwh":
        raise TraceError(path, f"unknown unit {unit!r}", "use unit = 'g_per_kwh' or 'lbs_per_mwh'")
    implausible = np.flatnonzero(values > MAX_PLAUSIBLE_G_PER_KWH)
    if len(implausible):
        raise TraceError(
            path,
            f"{values[implausible[0]]:.0f} gCO2/kWh in column {column!r} is above any real grid",
            "if the file is in lbs/MWh, declare unit = 'lbs_per_mwh' in the trace config",
            _line_of(implausible[0]),
        )
    return values


@dataclass(frozen=True)
class TraceSet:
    """All regions' signals of an experiment, with the files' checksums."""

    signals: dict[str, Signal]
    checksums: dict[str, str] = field(default_factory=dict)

    def signal(self, region: str, *, needed_by: str = "") -> Signal:
        if region not in self.signals:
            who = f" (needed by site {needed_by!r})" if needed_by else ""
            raise TraceError(
                ", ".join(sorted({s.source for s in self.signals.values()})) or "traces",
                f"no trace has region {region!r}{who}; regions available: {sorted(self.signals)}",
                "fix the site's region, or add a trace with that column (or rename it with `columns`)",
            )
        return self.signals[region]

    def require_span(self, region: str, start_s: float, end_s: float, *, needed_by: str = "") -> None:
        """Raise unless the region's trace covers [start, end) (a run must not outlast its trace)."""
        signal = self.signal(region, needed_by=needed_by)
        if start_s < signal.start_s or end_s > signal.end_s:
            raise TraceError(
                signal.source,
                f"the run spans {iso(start_s)} .. {iso(end_s)} but region {region!r} covers only "
                f"{iso(signal.start_s)} .. {iso(signal.end_s)}",
                "move the run's start/deadline inside the trace, or use a longer trace",
            )


def load_trace(source: TraceSource) -> TraceSet:
    """Load one CSV into per-region signals (gCO2/kWh, UTC)."""
    path = Path(source.path)
    frame = _read_csv(path)
    time_column = source.time_column or frame.columns[0]
    if time_column not in frame.columns:
        raise TraceError(path, f"no time column {time_column!r}; columns: {list(frame.columns)}", "set time_column")
    value_columns = [c for c in frame.columns if c != time_column]
    if not value_columns:
        raise TraceError(path, "no value columns next to the time column", "add one column per region")
    missing = [c for c in source.columns if c not in value_columns]
    if missing:
        raise TraceError(path, f"columns {missing} named in `columns` are not in the file", "fix the mapping")
    regions = [source.columns.get(c, c) for c in value_columns]
    twice = sorted({r for r in regions if regions.count(r) > 1})
    if twice:
        raise TraceError(path, f"several columns would become region {twice[0]!r}", "fix the `columns` mapping")
    _check_header(path, value_columns, source.unit)
    times_s = parse_times_utc(path, time_column, frame[time_column], source.naive_timezone)
    _check_order(path, times_s, source.max_gap_s)
    steps = np.diff(times_s)
    resolution_s = float(np.median(steps)) if len(steps) else 300.0
    signals = {}
    for column in value_columns:
        region = source.columns.get(column, column)
        values = _parse_values(path, column, frame[column], source.unit)
        signals[region] = Signal(region, times_s, values, resolution_s, source.signal, str(path))
    return TraceSet(signals, {str(path): sha256_of(path)})


def load_traces(sources: list[TraceSource]) -> TraceSet:
    """Load several trace files; a region may appear in only one of them."""
    signals: dict[str, Signal] = {}
    checksums: dict[str, str] = {}
    for source in sources:
        loaded = load_trace(source)
        for region, signal in loaded.signals.items():
            if region in signals:
                raise TraceError(
                    source.path,
                    f"region {region!r} is also in {signals[region].source}",
                    "rename one of them with `columns`, or drop one file",
                )
            signals[region] = signal
        checksums.update(loaded.checksums)
    return TraceSet(signals, checksums)


@dataclass(frozen=True)
class Forecast:
    """Forecasts issued for one region: at each ``request_s``, values for future instants."""

    region: str
    request_s: np.ndarray  # unique, increasing
    offsets: np.ndarray  # request i owns rows offsets[i]:offsets[i+1]
    target_s: np.ndarray
    ci_g_per_kwh: np.ndarray
    source: str = ""

    def latest(self, now_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """The newest forecast issued at or before ``now_s`` (targets, values), or None."""
        index = int(np.searchsorted(self.request_s, now_s, side="right")) - 1
        if index < 0:
            return None
        rows = slice(self.offsets[index], self.offsets[index + 1])
        return self.target_s[rows], self.ci_g_per_kwh[rows]

    def slice(self, start_s: float, end_s: float) -> Forecast:
        """The forecasts issued in ``[start_s, end_s)``, each whole (targets may lie after
        ``end_s``: what a forecast issued before the end said about later instants)."""
        first, last = np.searchsorted(self.request_s, [start_s, end_s], side="left")
        rows = slice(self.offsets[first], self.offsets[last])
        return Forecast(
            self.region,
            self.request_s[first:last],
            self.offsets[first : last + 1] - self.offsets[first],
            self.target_s[rows],
            self.ci_g_per_kwh[rows],
            self.source,
        )


def load_forecast(source: ForecastSource) -> Forecast:
    """Load a forecast CSV (may be gzipped) in gCO2/kWh (``source.unit`` converted here).

    Long layout (WattTime's): ``request_time, forecast_time, <value>``, sorted by request, then
    target. Wide layout: ``request_time, ahead_5min, ahead_10min, …`` — one row per issued
    forecast, sorted by ``request_time``; the value in column ``ahead_<m>min`` is the forecast
    for ``request_time + m`` minutes (the SGIP year: ``f1 … f36`` of the source, renamed).

    Example::

        load_forecast(ForecastSource(path="data/traces/sgip_moer_2020_caiso-pge_forecast.csv.gz",
                                     region="SGIP_CAISO_PGE"))
    """
    path = Path(source.path)
    frame = _read_csv(path)
    if frame.columns[0] == "request_time" and any(_LEAD_COLUMN.fullmatch(c) for c in frame.columns[1:]):
        return _wide_forecast(path, frame, source)
    expected = {"request_time", "forecast_time"}
    if not expected <= set(frame.columns) or len(frame.columns) != 3:
        raise TraceError(
            path,
            f"columns {list(frame.columns)} are not request_time, forecast_time, <value> "
            "(nor request_time, ahead_<minutes>min, …)",
            "export WattTime forecasts with exactly these three columns, or one row per issued "
            "forecast with a column per lead (request_time, ahead_5min, ahead_10min, …)",
            1,
        )
    value_column = next(c for c in frame.columns if c not in expected)
    _check_header(path, [value_column], source.unit)
    request_s = parse_times_utc(path, "request_time", frame["request_time"], source.naive_timezone)
    target_s = parse_times_utc(path, "forecast_time", frame["forecast_time"], source.naive_timezone)
    values = _parse_values(path, value_column, frame[value_column], source.unit)
    order = np.lexsort((target_s, request_s))
    if not np.array_equal(order, np.arange(len(order))):
        bad = int(np.flatnonzero(order != np.arange(len(order)))[0])
        raise TraceError(
            path, "rows are not sorted by request_time, then forecast_time", "sort the file", _line_of(bad)
        )
    repeated = np.flatnonzero((np.diff(request_s) == 0) & (np.diff(target_s) == 0))
    if len(repeated):
        row = int(repeated[0]) + 1
        raise TraceError(
            path,
            f"forecast for {iso(target_s[row])} issued at {iso(request_s[row])} appears twice",
            "keep one row per request_time and forecast_time",
            _line_of(row),
        )
    unique_requests, starts = np.unique(request_s, return_index=True)
    offsets = np.append(starts, len(request_s))
    return Forecast(source.region, unique_requests, offsets, target_s, values, str(path))


def _wide_forecast(path: Path, frame: pd.DataFrame, source: ForecastSource) -> Forecast:
    """One row per issued forecast, one ``ahead_<minutes>min`` column per lead."""
    lead_columns = list(frame.columns[1:])
    leads_s = []
    for column in lead_columns:
        named = _LEAD_COLUMN.fullmatch(column)
        if named is None or int(named.group(1)) <= 0:
            raise TraceError(
                path,
                f"column {column!r} is not a lead; a wide forecast has request_time, then ahead_<minutes>min columns",
                "name every lead column ahead_<minutes>min with minutes > 0 (ahead_5min, ahead_10min, …)",
                1,
            )
        leads_s.append(60.0 * int(named.group(1)))
    leads = np.array(leads_s)
    if np.any(np.diff(leads) <= 0):
        bad = lead_columns[int(np.flatnonzero(np.diff(leads) <= 0)[0]) + 1]
        raise TraceError(path, f"lead column {bad!r} is not after the one before it", "order the lead columns by lead", 1)
    request_s = parse_times_utc(path, "request_time", frame["request_time"], source.naive_timezone)
    _check_order(path, request_s, None)
    values = np.column_stack(
        [_parse_values(path, column, frame[column], source.unit) for column in lead_columns]
    )
    num_requests, num_leads = values.shape
    return Forecast(
        source.region,
        request_s,
        np.arange(num_requests + 1) * num_leads,
        (request_s[:, None] + leads[None, :]).ravel(),
        values.ravel(),
        str(path),
    )
