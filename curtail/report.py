"""The report: figures drawn from run directories, and from nothing else.

:func:`report` reads run directories (simulated or real, through
:func:`curtail.runlog.read_run_dir`) and writes, as PNG and PDF:

* ``timeline_<run>``: per run, the grid carbon intensity of each site's region with the
  threshold and the spans each site trained; each site's state over time; the run mode
  (IDLE / SINGLE / FEDERATED). Times are UTC.
* ``emissions``: ``emissions_kg`` per run.
* ``windows_share``: ``share_energy_in_windows`` and ``window_utilisation`` per run.
* ``loss_<run>``: loss against tokens, for runs that logged losses (real runs).

Example::

    from curtail.api import simulate
    from curtail.report import report

    result = simulate("experiments/paper.toml")
    paths = report(result.run_dirs, "runs/paper/report")

Matplotlib is imported inside the functions and figures are drawn on Agg canvases, so
importing this module (or running it on a headless machine) touches no global backend.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from curtail.runlog import RUN_FILES, RunRecord, read_run_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = ("png", "pdf")
PNG_DPI = 150

# Colours: states run from grey (nothing) through warm (getting ready) to green (training);
# syncing is dark so the short syncs read as ticks on the green bar.
STATE_COLOURS = {
    "off": "#e6e6e6",
    "provisioning": "#f1c453",
    "starting": "#f08a24",
    "waiting": "#a07cc5",
    "training": "#3a9d5d",
    "syncing": "#1d3557",
}
MODE_COLOURS = {"IDLE": "#d4d4d4", "SINGLE": "#8ecae6", "FEDERATED": "#1f6fae"}
SITE_COLOURS = (
    "#1f77b4",
    "#d62728",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
)
# The shipped traces' regions keep one colour in every figure of every report; other regions
# (and sites without one) take a colour from SITE_COLOURS by a stable hash of their name.
REGION_COLOURS = {
    "CAISO_NORTH": "#1f77b4",
    "SPP_TX": "#d62728",
    "NEM_SA": "#ff7f0e",
    "DE": "#9467bd",
    "GB": "#8c564b",
    "CAISO_PGE": "#17becf",
    "CAISO_SCE": "#e377c2",
}
POLICY_COLOURS = ("#7f8c8d", "#3a9d5d", "#1f6fae", "#f08a24", "#9467bd", "#d62728")
METRIC_COLOURS = {"share_energy_in_windows": "#3a9d5d", "window_utilisation": "#1f6fae"}

# Intervals narrower than this share of the time axis would vanish as bars (a 5 s sync in
# a 13 h run); they are drawn as thin ticks of their state's colour instead.
MIN_BAR_FRACTION = 0.002
# In the carbon-intensity panel a site's training spans are merged across pauses shorter
# than this share of the axis (syncs, the prior system's per-round restarts): that panel
# says when a site trained; the state panel below shows every pause.
SPAN_GAP_FRACTION = 0.01

_TIMESERIES_COLUMNS = ("time", "site", "ci_g_per_kwh")
_INTERVAL_COLUMNS = ("site", "state", "start_s", "end_s")
_MODE_COLUMNS = ("mode", "start_s", "end_s")
_SUMMARY_KEYS = (
    "run",
    "sites",
    "start",
    "finish",
    "emissions_kg",
    "share_energy_in_windows",
    "window_utilisation",
    "hours",
)


@dataclass(frozen=True)
class _Run:
    """A loaded run directory and the name its figures carry."""

    name: str
    record: RunRecord
    path: Path

    @property
    def summary(self) -> dict[str, Any]:
        return self.record.summary


def report(run_dirs: Sequence[str | Path], out_dir: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the report's figures for the given run directories; return the files written.

    Args:
        run_dirs: run directories (``<output_dir>/<experiment>/<run>``), simulated or real.
            All of them are checked before anything is drawn.
        out_dir: folder for the figures (created if needed); existing figures are replaced.
        formats: file types, of ``"png"`` and ``"pdf"``.

    Returns:
        The PNG and PDF paths, in order: ``timeline_<run>`` for each run with at least
        one site, ``emissions``, ``windows_share``, ``cumulative_emissions``, then ``loss_<run>`` for each run with
        logged losses and ``sync_<run>`` for each real run that synchronised.

    Raises:
        ValueError: ``run_dirs`` is empty, or a run directory lacks a column or key the
            figures need.
        FileNotFoundError: a path is not a (complete) run directory.

    Example::

        report(["runs/paper/threshold", "runs/paper/centralized-de"], "runs/paper/report")
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("report() needs at least one run directory; got an empty list")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"figure formats {list(formats)}: choose from {list(FORMATS)}")
    runs = _name_runs([load_run(path) for path in run_dirs])

    def save(fig: Figure, stem: Path) -> list[Path]:
        return _save(fig, stem, formats)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    for run in runs:
        if run.summary["sites"]:
            written += save(
                timeline_figure(run.record, title=run.name), out / f"timeline_{_slug(run.name)}"
            )
    names = [run.name for run in runs]
    summaries = [run.summary for run in runs]
    written += save(emissions_figure(names, summaries), out / "emissions")
    written += save(windows_share_figure(names, summaries), out / "windows_share")
    written += save(cumulative_emissions_figure([run.record for run in runs], names), out / "cumulative_emissions")
    for run in runs:
        losses = loss_points(run.record)
        if losses is not None:
            figure = loss_figure(losses, title=run.name, sites=run.summary["sites"], regions=run.summary.get("regions"))
            written += save(figure, out / f"loss_{_slug(run.name)}")
    for run in runs:
        traffic = sync_rounds(run.record)
        if traffic is not None:
            figure = sync_figure(traffic, title=run.name, sites=run.summary["sites"], regions=run.summary.get("regions"))
            written += save(figure, out / f"sync_{_slug(run.name)}")
    return written


def load_run(path: str | Path) -> RunRecord:
    """Read a run directory and check it holds what the report draws.

    Raises ``FileNotFoundError`` (naming the path and the missing files) for a folder that
    is not a run directory, and ``ValueError`` for one missing a column or summary key.
    """
    path = Path(path)
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise FileNotFoundError(f"{path} is not a run directory: {what}")
    if not (path / "summary.json").is_file():
        children = sorted(
            child.name for child in path.iterdir() if (child / "summary.json").is_file()
        )
        if children:
            shown = ", ".join(str(path / name) for name in children[:3])
            raise FileNotFoundError(
                f"{path} is not a run directory (no summary.json) but holds run directories: "
                f"pass those instead, e.g. {shown}"
            )
    try:
        record = read_run_dir(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; a run directory holds {', '.join(RUN_FILES)}") from None
    _require_keys(path / "summary.json", record.summary, _SUMMARY_KEYS)
    sites = record.summary["sites"]
    if sites:
        timeseries_file = next(
            (name for name in RUN_FILES if name.startswith("timeseries")), "timeseries"
        )
        _require_columns(path / timeseries_file, record.timeseries, _TIMESERIES_COLUMNS)
        if not pd.api.types.is_datetime64_any_dtype(record.timeseries["time"]):
            record.timeseries["time"] = pd.to_datetime(record.timeseries["time"], utc=True)
        _require_columns(path / "intervals.csv", record.intervals, _INTERVAL_COLUMNS)
        _require_columns(path / "modes.csv", record.modes, _MODE_COLUMNS)
    return record


def site_colour(site: str, region: str | None = None) -> str:
    """A site's colour, the same in every figure: its region's (:data:`REGION_COLOURS`), else
    one of :data:`SITE_COLOURS` chosen by a stable hash of the region (or site) name."""
    key = (region or site).upper().replace("-", "_")
    if key in REGION_COLOURS:
        return REGION_COLOURS[key]
    return SITE_COLOURS[zlib.crc32(key.encode()) % len(SITE_COLOURS)]


def site_colours_of(sites: Sequence[str], regions: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`site_colour` of each of ``sites`` (``regions``: a run summary's site → region)."""
    return {site: site_colour(site, (regions or {}).get(site)) for site in sites}


def timeline_figure(record: RunRecord, *, title: str | None = None) -> Figure:
    """Carbon intensity per region, each site's state, and the run mode, on one UTC axis."""
    from matplotlib import dates as mdates
    from matplotlib.patches import Patch

    summary = record.summary
    sites: list[str] = list(summary["sites"])
    regions: dict[str, str] = summary.get("regions") or {}
    site_colours = site_colours_of(sites, regions)
    start, finish = _utc(summary["start"]), _utc(summary["finish"])
    x0, x1 = mdates.date2num(start), mdates.date2num(finish)
    if x1 <= x0:
        x1 = x0 + 1 / 24
    min_width = MIN_BAR_FRACTION * (x1 - x0)

    fig = _figure(figsize=(12.5, 4.6 + 0.45 * len(sites)))
    grid = fig.add_gridspec(3, 1, height_ratios=[4.2, 0.55 * len(sites) + 0.3, 0.45], hspace=0.06)
    ax_ci = fig.add_subplot(grid[0])
    ax_state = fig.add_subplot(grid[1], sharex=ax_ci)
    ax_mode = fig.add_subplot(grid[2], sharex=ax_ci)

    # -- carbon intensity, threshold, trained spans: each region's curve is drawn faint, and
    # bold (over a light span of the site's colour) where its site trained, so overlapping
    # sites and curves lying on zero stay readable
    training_spans = _training_spans(
        record.intervals, max_gap_s=SPAN_GAP_FRACTION * (finish - start).total_seconds()
    )
    ts = record.timeseries
    for site in sites:
        rows = ts[ts["site"] == site].sort_values("time")
        if rows.empty:
            continue
        x = mdates.date2num(rows["time"].dt.to_pydatetime())
        y = rows["ci_g_per_kwh"].to_numpy(dtype=float)
        # each row holds its interval's value: extend the last step to the run's end
        x, y = np.append(x, max(x1, x[-1])), np.append(y, y[-1])
        colour = site_colours[site]
        region = regions.get(site, site)
        label = region if region == site else f"{region} ({site})"
        ax_ci.step(x, y, where="post", color=colour, lw=1.1, alpha=0.45)
        ax_ci.plot([], [], color=colour, lw=2.4, label=label)
        for span_start, span_end in training_spans.get(site, []):
            ax_ci.axvspan(span_start, span_end, color=colour, alpha=0.08, lw=0)
            inside = (x > span_start) & (x < span_end)
            xs = np.concatenate([[span_start], x[inside], [span_end]])
            ax_ci.step(
                xs,
                _step_values(x, y, xs),
                where="post",
                color=colour,
                lw=2.4,
                solid_capstyle="butt",
            )
    threshold = summary.get("threshold_g_per_kwh")
    if threshold is not None:
        ax_ci.axhline(
            threshold, color="black", ls="--", lw=1.1, label=f"threshold {threshold:g} g/kWh"
        )
    elif summary.get("threshold_kind") == "percentile":  # no single level: name the rule
        ax_ci.plot(
            [], [], " ",
            label=f"curtailed below percentile {summary['threshold_percentile']:g} of the "
            f"trailing {summary['percentile_window_s'] / 3600:g} h",
        )
    # a little room below zero keeps fully renewable stretches (CI ≈ 0) off the axis line
    top = ax_ci.get_ylim()[1]
    ax_ci.set_ylim(-0.03 * top, top)
    ax_ci.set_ylabel("carbon intensity\n(gCO₂/kWh)")
    handles, labels = ax_ci.get_legend_handles_labels()
    handler_map = {}
    if training_spans:  # what a trained span looks like: a bold line over a light shade (here grey)
        from matplotlib.legend_handler import HandlerTuple
        from matplotlib.lines import Line2D

        trained = (Patch(facecolor="#555555", alpha=0.12, lw=0), Line2D([], [], color="#555555", lw=2.4))
        handles.append(trained)
        labels.append("site trained (its colour)")
        handler_map[tuple] = HandlerTuple(ndivide=1)
    ax_ci.legend(handles, labels, handler_map=handler_map, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                 frameon=False, fontsize=9)
    ax_ci.grid(axis="y", color="#e0e0e0", lw=0.8)
    ax_ci.set_axisbelow(True)

    # -- site states
    bar_height = 0.62
    intervals = record.intervals
    for row, site in enumerate(sites):
        mine = intervals[intervals["site"] == site]
        for state, group in mine.groupby("state", sort=False):
            colour = STATE_COLOURS.get(str(state), "#bbbbbb")
            starts = _epoch_to_num(group["start_s"].to_numpy(dtype=float))
            widths = _epoch_to_num(group["end_s"].to_numpy(dtype=float)) - starts
            wide = widths >= min_width
            ax_state.broken_barh(
                list(zip(starts[wide], widths[wide])),
                (row - bar_height / 2, bar_height),
                facecolors=colour,
                lw=0,
            )
            if (~wide).any():
                ax_state.vlines(
                    starts[~wide] + widths[~wide] / 2,
                    row - bar_height / 2,
                    row + bar_height / 2,
                    colors=colour,
                    lw=0.8,
                )
    ax_state.set_yticks(range(len(sites)))
    ax_state.set_yticklabels(sites)
    for tick, site in zip(ax_state.get_yticklabels(), sites):
        tick.set_color(site_colours[site])
        tick.set_fontweight("bold")
    ax_state.set_ylim(len(sites) - 0.5, -0.5)
    ax_state.tick_params(axis="y", length=0)
    seen_states = [s for s in STATE_COLOURS if s in set(intervals["state"].astype(str))]
    seen_states += sorted(set(intervals["state"].astype(str)) - set(STATE_COLOURS))
    ax_state.legend(
        handles=[Patch(facecolor=STATE_COLOURS.get(s, "#bbbbbb"), label=s) for s in seen_states],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize=9,
        title="site state",
        title_fontsize=9,
        alignment="left",
    )

    # -- run mode
    modes = record.modes
    for mode, group in modes.groupby("mode", sort=False):
        starts = _epoch_to_num(group["start_s"].to_numpy(dtype=float))
        widths = _epoch_to_num(group["end_s"].to_numpy(dtype=float)) - starts
        ax_mode.broken_barh(
            list(zip(starts, widths)),
            (0, 1),
            facecolors=MODE_COLOURS.get(str(mode), "#bbbbbb"),
            lw=0,
        )
    ax_mode.set_ylim(0, 1)
    ax_mode.set_yticks([0.5])
    ax_mode.set_yticklabels(["run mode"])
    ax_mode.tick_params(axis="y", length=0)
    seen_modes = [m for m in MODE_COLOURS if m in set(modes["mode"].astype(str))]
    ax_mode.legend(
        handles=[Patch(facecolor=MODE_COLOURS[m], label=m) for m in seen_modes],
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
        fontsize=9,
        ncol=len(seen_modes) or 1,
        handlelength=1.2,
        columnspacing=0.9,
    )

    # -- shared UTC time axis
    locator = mdates.AutoDateLocator(tz=UTC, minticks=6, maxticks=14)
    formatter = mdates.ConciseDateFormatter(
        locator,
        tz=UTC,
        show_offset=False,
        zero_formats=["", "%Y", "%d %b", "%d %b", "%H:%M", "%H:%M"],
    )
    ax_mode.xaxis.set_major_locator(locator)
    ax_mode.xaxis.set_major_formatter(formatter)
    ax_mode.set_xlim(x0, x1)
    ax_mode.set_xlabel(f"time (UTC), {start:%Y-%m-%d %H:%M} to {finish:%Y-%m-%d %H:%M}")
    for ax in (ax_ci, ax_state):
        ax.tick_params(axis="x", labelbottom=False)
    for ax in (ax_ci, ax_state, ax_mode):
        ax.grid(axis="x", color="#d0d0d0", lw=0.6, ls=":")
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for side in ("left", "top", "right"):
        ax_mode.spines[side].set_visible(False)

    name = title or summary["run"]
    fig.suptitle(
        f"{name}: {_fmt(summary.get('emissions_kg'), '{:.2f} kg CO₂')}"
        f"  ·  {_fmt(summary.get('share_energy_in_windows'), '{:.0%}')} of energy in curtailment windows"
        f"  ·  {_fmt(summary.get('hours'), '{:.1f} h')}",
        x=0.02,
        ha="left",
        fontsize=12,
        fontweight="bold",
    )
    return fig


def emissions_figure(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> Figure:
    """Horizontal bars of ``emissions_kg`` per run, coloured by policy, values annotated; a
    black diamond where the run's config carries a published value (``summary["reference"]``)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    values = np.array([_number(s.get("emissions_kg")) for s in summaries])
    policies = [str(s.get("policy", "")) for s in summaries]
    policy_colours = {
        p: POLICY_COLOURS[i % len(POLICY_COLOURS)] for i, p in enumerate(dict.fromkeys(policies))
    }

    fig = _figure(figsize=(9, 1.2 + 0.48 * len(names)))
    ax = fig.add_subplot()
    rows = np.arange(len(names))
    ax.barh(rows, np.nan_to_num(values), height=0.62, color=[policy_colours[p] for p in policies])
    published = np.array([_number((s.get("reference") or {}).get("emissions_kg")) for s in summaries])
    top = np.nanmax(np.concatenate([values, published])) if np.isfinite(values).any() else 1.0
    for row, value, value_published in zip(rows, values, published):
        text = "n/a" if not np.isfinite(value) else f"{value:.2f} kg"
        if np.isfinite(value_published):
            text += f"  (published {value_published:g})"
        ax.text(max(np.nan_to_num(value), np.nan_to_num(value_published)) + 0.015 * top, row, text,
                va="center", ha="left", fontsize=9)
    has_published = np.isfinite(published).any()
    if has_published:
        ax.scatter(published, rows, marker="D", s=28, color="black", zorder=3)
    ax.set_yticks(rows)
    ax.set_yticklabels(names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, (top or 1.0) * (1.45 if has_published else 1.15))
    ax.set_xlabel("emissions (kg CO₂)")
    fig.suptitle("Emissions per run", x=0.02, ha="left", fontsize=12, fontweight="bold")
    if any(policy_colours):
        handles = [Patch(facecolor=c, label=p or "unknown") for p, c in policy_colours.items()]
        if has_published:
            handles.append(Line2D([], [], marker="D", ls="", color="black", label="published"))
        ax.legend(
            handles=handles,
            title="policy",
            loc="lower right",
            frameon=False,
            fontsize=9,
            title_fontsize=9,
        )
    _tidy_bar_axes(ax)
    return fig


def cumulative_emissions_figure(records: Sequence[RunRecord], names: Sequence[str]) -> Figure:
    """Emissions so far against hours since the run's start: one line per run (its sites
    summed, from ``timeseries.parquet``), its total at the end; the runs share the axes."""
    from matplotlib import colormaps

    run_colours = colormaps["tab10"].colors
    fig = _figure(figsize=(9, 5))
    ax = fig.add_subplot()
    for index, (record, name) in enumerate(zip(records, names)):
        ts = record.timeseries
        if ts.empty or "emissions_kg" not in ts.columns:
            continue
        per_step = ts.groupby("time", sort=True)["emissions_kg"].sum()
        start = _utc(record.summary["start"])
        hours = np.concatenate([[0.0], (per_step.index - start).total_seconds().to_numpy() / 3600
                                + _step_hours(per_step.index)])
        total = np.concatenate([[0.0], per_step.cumsum().to_numpy()])
        colour = run_colours[index % len(run_colours)]
        ax.plot(hours, total, color=colour, lw=1.6, label=name)
        ax.annotate(f"{total[-1]:.2f} kg", (hours[-1], total[-1]), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8, color=colour)
    ax.set_xlabel("hours since the run's start")
    ax.set_ylabel("emissions so far (kg CO₂)")
    fig.suptitle("Cumulative emissions", x=0.02, ha="left", fontsize=12, fontweight="bold")
    ax.grid(color="#e0e0e0", lw=0.8)
    ax.legend(frameon=False, fontsize=9, loc="upper left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def _step_hours(times: pd.DatetimeIndex) -> float:
    """The timeseries' resolution in hours (a row's emissions are those of its step)."""
    return float(np.median(np.diff(times.asi8)) / 3.6e12) if len(times) > 1 else 0.0


def windows_share_figure(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> Figure:
    """Grouped horizontal bars per run (%): the share of energy drawn inside curtailment
    windows (``share_energy_in_windows``) and the share of window time its sites spent
    training (``window_utilisation``)."""
    metrics = {
        "share_energy_in_windows": "energy drawn inside curtailment windows",
        "window_utilisation": "window time spent training",
    }
    fig = _figure(figsize=(9, 1.6 + 0.62 * len(names)))
    ax = fig.add_subplot()
    rows = np.arange(len(names))
    height = 0.38
    for k, (key, label) in enumerate(metrics.items()):
        values = np.array([_number(s.get(key)) * 100 for s in summaries])
        offset = (k - 0.5) * height
        ax.barh(
            rows + offset,
            np.nan_to_num(values),
            height=height * 0.92,
            color=METRIC_COLOURS[key],
            label=label,
        )
        for row, value, summary in zip(rows, values, summaries):
            text = "n/a" if not np.isfinite(value) else f"{value:.0f}%"
            if key == "window_utilisation" and not _has_windows(summary):
                text = "no windows"
            ax.text(
                np.nan_to_num(value) + 0.8, row + offset, text, va="center", ha="left", fontsize=8
            )
    ax.set_yticks(rows)
    ax.set_yticklabels(names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("share (%)")
    fig.suptitle(
        "Training inside curtailment windows", x=0.02, ha="left", fontsize=12, fontweight="bold"
    )
    fig.legend(loc="outside lower center", ncol=2, frameon=False, fontsize=9)
    _tidy_bar_axes(ax)
    return fig


def loss_points(record: RunRecord) -> pd.DataFrame | None:
    """The run's losses as ``tokens, loss, site, kind`` rows, or ``None`` when it logged none.

    ``losses.csv`` (real runs; tokens counted across sites, site ``""`` for the global
    model) is preferred; otherwise the ``loss`` column of the timeseries (each site's
    cumulative tokens).
    """
    losses = record.losses
    if losses is not None and {"tokens", "loss"} <= set(losses.columns):
        frame = losses.dropna(subset=["tokens", "loss"])
        if not frame.empty:
            return pd.DataFrame(
                {
                    "tokens": frame["tokens"].astype(float),
                    "loss": frame["loss"].astype(float),
                    "site": frame["site"].fillna("").astype(str) if "site" in frame else "",
                    "kind": frame["kind"].fillna("train").astype(str)
                    if "kind" in frame
                    else "train",
                }
            )
    ts = record.timeseries
    if {"loss", "tokens", "site"} <= set(ts.columns):
        frame = ts.dropna(subset=["loss", "tokens"])
        if not frame.empty:
            return pd.DataFrame(
                {
                    "tokens": frame["tokens"].astype(float),
                    "loss": frame["loss"].astype(float),
                    "site": frame["site"].astype(str),
                    "kind": "train",
                }
            )
    return None


def loss_figure(losses: pd.DataFrame, *, title: str, sites: Sequence[str] = (),
                regions: Mapping[str, str] | None = None) -> Figure:
    """Loss against tokens: one line per site and kind, sites in their colours
    (:func:`site_colour`), the global model in black; evaluations dashed with markers."""
    from matplotlib.ticker import FuncFormatter

    colours = site_colours_of([*sites, *sorted(set(losses["site"]) - {""})], regions)
    colours[""] = "black"
    fig = _figure(figsize=(9, 5))
    ax = fig.add_subplot()
    for (site, kind), group in sorted(
        losses.groupby(["site", "kind"], sort=False), key=lambda item: (item[0][0] != "", item[0])
    ):
        group = group.sort_values("tokens")
        is_eval = kind == "eval"
        ax.plot(
            group["tokens"],
            group["loss"],
            color=colours[site],
            lw=1.8 if is_eval else 1.2,
            ls="--" if is_eval else "-",
            marker="o" if is_eval else None,
            ms=4,
            label=f"{site or 'global model'} · {kind}",
        )
    ax.xaxis.set_major_formatter(FuncFormatter(lambda tokens, _: _tokens_label(tokens)))
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    fig.suptitle(f"{title}: loss", x=0.02, ha="left", fontsize=12, fontweight="bold")
    ax.grid(color="#e0e0e0", lw=0.8)
    ax.legend(frameon=False, fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def sync_rounds(record: RunRecord) -> pd.DataFrame | None:
    """A real run's synchronisation per site and round from ``timings.csv``: ``site, round,
    mb_sent, mb_received, blocked_s`` (submit and load commands; None for a simulated run or
    one from before bytes were recorded)."""
    timings = record.timings
    if timings is None or "num_bytes" not in timings.columns:
        return None
    rows = timings[timings["kind"].isin(["submit", "load"]) & timings["site"].fillna("").astype(bool)]
    if rows.empty:
        return None
    rows = rows.assign(
        mb_sent=np.where(rows["kind"] == "submit", rows["num_bytes"], 0) / 1e6,
        mb_received=np.where(rows["kind"] == "load", rows["num_bytes"], 0) / 1e6,
        blocked_s=rows["wall_s"],
    )
    return rows.groupby(["site", "round"], as_index=False)[["mb_sent", "mb_received", "blocked_s"]].sum()


def sync_figure(traffic: pd.DataFrame, *, title: str, sites: Sequence[str] = (),
                regions: Mapping[str, str] | None = None) -> Figure:
    """Per round and site: megabytes sent (pseudo-gradients) and received (global weights), and
    the seconds the site spent in them instead of training."""
    colours = site_colours_of([*sites, *sorted(set(traffic["site"]))], regions)
    fig = _figure(figsize=(9, 5.5))
    volume, blocked = fig.subplots(2, 1, sharex=True)
    for site, group in traffic.groupby("site", sort=False):
        group = group.sort_values("round")
        volume.plot(group["round"], group["mb_sent"], color=colours[site], marker="o", ms=3, lw=1.2,
                    label=f"{site} · sent")
        volume.plot(group["round"], group["mb_received"], color=colours[site], ls="--", lw=1.2,
                    label=f"{site} · received")
        blocked.plot(group["round"], group["blocked_s"], color=colours[site], marker="o", ms=3, lw=1.2, label=site)
    volume.set_ylabel("MB per round")
    blocked.set_ylabel("s not training")
    blocked.set_xlabel("round")
    fig.suptitle(f"{title}: synchronisation", x=0.02, ha="left", fontsize=12, fontweight="bold")
    for ax in (volume, blocked):
        ax.grid(color="#e0e0e0", lw=0.8)
        ax.legend(frameon=False, fontsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig


# -- helpers -------------------------------------------------------------------------------


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure on an Agg canvas, independent of pyplot and of the user's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Save ``stem.png`` and ``stem.pdf`` (those of ``formats``). (The PDF keeps matplotlib's Type 3 fonts:
    embedding TrueType subsets triples the time per PDF; pass ``pdf.fonttype=42`` through
    ``matplotlib.rc_context`` around :func:`report` for venues that require it.)"""
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=PNG_DPI, facecolor="white")
        # the layout is in figure fractions and points, the same in every format: solve it once
        fig.set_layout_engine("none")
        paths.append(path)
    return paths


def _name_runs(records: list[RunRecord]) -> list[_Run]:
    """Name each run by ``summary["run"]``; runs of the same name from different experiments
    get their parent folder (the experiment) as a prefix, so their figures do not collide."""
    names = [str(record.summary["run"]) for record in records]
    duplicated = {name for name in names if names.count(name) > 1}
    runs = []
    for record, name in zip(records, names):
        path = Path(record.path) if record.path is not None else Path(name)
        if name in duplicated:
            name = f"{path.resolve().parent.name}-{name}"
        runs.append(_Run(name=name, record=record, path=path))
    final = [run.name for run in runs]
    if len(set(final)) != len(final):
        repeated = sorted({n for n in final if final.count(n) > 1})
        raise ValueError(
            f"run directories given more than once (or with the same experiment and run name): {repeated}"
        )
    return runs


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _require_columns(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing} the report needs; rewrite the run directory with curtail.runlog.write_run_dir"
        )


def _require_keys(path: Path, summary: dict[str, Any], keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in summary]
    if missing:
        raise ValueError(
            f"{path} lacks key(s) {missing} the report needs; rewrite the run directory with curtail.runlog.write_run_dir"
        )


def _training_spans(
    intervals: pd.DataFrame, max_gap_s: float = 0.0
) -> dict[str, list[tuple[float, float]]]:
    """Per site, spans (matplotlib date numbers) of training and syncing, merged across
    pauses of at most ``max_gap_s`` seconds."""
    spans: dict[str, list[tuple[float, float]]] = {}
    active = intervals[intervals["state"].isin(["training", "syncing"])]
    for site, group in active.groupby("site", sort=False):
        merged: list[list[float]] = []
        for start_s, end_s in sorted(
            zip(group["start_s"].astype(float), group["end_s"].astype(float))
        ):
            if merged and start_s <= merged[-1][1] + max_gap_s + 1e-6:
                merged[-1][1] = max(merged[-1][1], end_s)
            else:
                merged.append([start_s, end_s])
        spans[str(site)] = [(float(_epoch_to_num(a)), float(_epoch_to_num(b))) for a, b in merged]
    return spans


def _step_values(x: np.ndarray, y: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Values of the post-step function through (x, y) at the query points."""
    index = np.clip(np.searchsorted(x, query, side="right") - 1, 0, len(y) - 1)
    return y[index]


def _epoch_to_num(seconds: Any) -> Any:
    """Unix seconds (UTC) to matplotlib date numbers (days since matplotlib's epoch)."""
    from matplotlib import dates as mdates

    epoch = mdates.date2num(datetime(1970, 1, 1, tzinfo=UTC))
    return np.asarray(seconds, dtype=float) / 86400.0 + epoch


def _utc(text: str) -> datetime:
    """An ISO instant from summary.json as a tz-aware UTC datetime (naive means UTC)."""
    instant = pd.Timestamp(text)
    instant = instant.tz_localize("UTC") if instant.tzinfo is None else instant.tz_convert("UTC")
    return instant.to_pydatetime()


def _tokens_label(tokens: float) -> str:
    """12e9 -> '12B', 5e8 -> '500M', the way token counts are spoken of."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:g}{suffix}"
    return f"{tokens:g}"


def _has_windows(summary: dict[str, Any]) -> bool:
    """Whether any site's signal fell below the threshold during the run (unknown: True)."""
    curtailed = summary.get("curtailed_hours")
    if not isinstance(curtailed, dict):
        return True
    return sum(_number(hours) for hours in curtailed.values() if np.isfinite(_number(hours))) > 0


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value: Any, pattern: str) -> str:
    number = _number(value)
    return "n/a" if not np.isfinite(number) else pattern.format(number)


def _tidy_bar_axes(ax: Axes) -> None:
    ax.grid(axis="x", color="#e0e0e0", lw=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
