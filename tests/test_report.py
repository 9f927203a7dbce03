"""The report draws every figure from run directories alone, and refuses other folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import curtail.api
from curtail.report import report

PAPER = Path(__file__).parents[1] / "experiments" / "paper.toml"
RUNS = (
    "centralized-caiso_north",
    "centralized-spp_tx",
    "centralized-nem_sa",
    "centralized-de",
    "always-on-federated",
    "threshold-prior-overheads",
    "threshold",
)


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    result = curtail.api.simulate(PAPER, output_dir=root)
    return [Path(path) for path in result.run_dirs]


@pytest.fixture(scope="module")
def paper_report(
    paper_runs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("report")
    return out, report(paper_runs, out)


def assert_real_png(path: Path, min_width: int = 600, min_height: int = 300) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, f"{path.name} is only {width}×{height}"
    rgb = image[..., :3]
    assert rgb.std() > 0.05, f"{path.name} is (almost) uniform"
    # more than background and ink: at least one more colour (16 levels a channel) covering
    # a visible share of the image
    levels = (rgb * 15).round().astype(int)
    colours = np.bincount(
        (levels[..., 0] * 256 + levels[..., 1] * 16 + levels[..., 2]).ravel(), minlength=4096
    )
    assert (colours > 0.0005 * colours.sum()).sum() >= 3, f"{path.name} shows fewer than 3 colours"


def assert_real_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 5_000, f"{path.name} is not a real PDF"


def test_report_writes_every_figure(
    paper_runs: list[Path], paper_report: tuple[Path, list[Path]]
) -> None:
    out, paths = paper_report
    assert {path.name for path in paper_runs} == set(RUNS)
    stems = [f"timeline_{run}" for run in sorted(RUNS)] + ["emissions", "windows_share", "cumulative_emissions"]
    expected = {out / f"{stem}.{fmt}" for stem in stems for fmt in ("png", "pdf")}
    assert set(paths) == expected
    assert len(paths) == len(expected)  # no figure written twice
    for path in paths:
        assert path.is_file()
        if path.suffix == ".png":
            assert_real_png(path)
        else:
            assert_real_pdf(path)
    # simulated runs log no losses: no loss figure
    assert not list(out.glob("loss_*"))


def test_a_site_keeps_its_colour_in_every_figure_of_every_run() -> None:
    from curtail.report import REGION_COLOURS, site_colour, site_colours_of

    # the paper's regions in any order, any run: one colour each, all different
    one = site_colours_of(["nem_sa", "spp_tx"], {"nem_sa": "NEM_SA", "spp_tx": "SPP_TX"})
    two = site_colours_of(["spp_tx", "caiso_north", "nem_sa"],
                          {"nem_sa": "NEM_SA", "spp_tx": "SPP_TX", "caiso_north": "CAISO_NORTH"})
    assert one["nem_sa"] == two["nem_sa"] == REGION_COLOURS["NEM_SA"] and one["spp_tx"] == two["spp_tx"]
    assert len(set(two.values())) == 3
    assert site_colour("x", "Some_Region") == site_colour("y", "SOME-REGION")  # by region, stable


def test_cumulative_emissions_end_at_each_runs_total(paper_runs: list[Path]) -> None:
    from curtail.report import cumulative_emissions_figure, load_run

    records = [load_run(path) for path in paper_runs]
    figure = cumulative_emissions_figure(records, [path.name for path in paper_runs])
    lines = figure.axes[0].get_lines()
    assert len(lines) == len(records)
    for line, record in zip(lines, records):
        hours, kg = line.get_data()
        assert kg[0] == 0 and np.all(np.diff(kg) >= 0)  # emissions only accumulate
        assert kg[-1] == pytest.approx(record.summary["emissions_kg"], rel=1e-9)
        assert hours[-1] == pytest.approx(record.summary["hours"], abs=5 / 60)  # to the last 5-min step


def test_the_emissions_chart_marks_the_published_values(paper_runs: list[Path]) -> None:
    from curtail.report import emissions_figure, load_run

    summaries = [load_run(path).summary for path in paper_runs]
    figure = emissions_figure([path.name for path in paper_runs], summaries)
    (markers,) = figure.axes[0].collections
    published = [s["reference"]["emissions_kg"] for s in summaries if (s.get("reference") or {}).get("emissions_kg")]
    assert published and sorted(markers.get_offsets()[:, 0].compressed()) == sorted(published)
    assert "published" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_timeline_is_wide_and_layered(paper_report: tuple[Path, list[Path]]) -> None:
    import matplotlib.image

    out, _ = paper_report
    image = matplotlib.image.imread(out / "timeline_threshold.png")
    height, width = image.shape[:2]
    assert width > 1.5 * height  # a timeline, not a square
    # the state panel shows the training colour (#3a9d5d) on a good share of the image
    green = np.abs(image[..., :3] - np.array([0x3A, 0x9D, 0x5D]) / 255).max(axis=-1) < 0.02
    assert green.mean() > 0.03


def test_loss_figure_when_losses_logged(paper_runs: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "threshold"
    shutil.copytree(next(path for path in paper_runs if path.name == "threshold"), run)
    tokens = np.linspace(0, 12e9, 60)
    rows = [
        {
            "t_s": i,
            "site": site,
            "tokens": t,
            "loss": 10.5 * (1 + t / 1e9) ** -0.4 + shift,
            "kind": "train",
        }
        for i, t in enumerate(tokens)
        for site, shift in (("caiso_north", 0.05), ("nem_sa", -0.05))
    ]
    rows += [
        {"t_s": i, "site": "", "tokens": t, "loss": 10.5 * (1 + t / 1e9) ** -0.4, "kind": "eval"}
        for i, t in enumerate(tokens[::10])
    ]
    pd.DataFrame(rows).to_csv(run / "losses.csv", index=False)

    paths = report([run], tmp_path / "out")

    assert tmp_path / "out" / "loss_threshold.png" in paths
    assert tmp_path / "out" / "loss_threshold.pdf" in paths
    assert_real_png(tmp_path / "out" / "loss_threshold.png")


def test_not_a_run_directory_is_refused(paper_runs: list[Path], tmp_path: Path) -> None:
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "readme.txt").write_text("not a run")
    with pytest.raises(FileNotFoundError, match=r"notes.*summary\.json"):
        report([stray], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        report([tmp_path / "missing"], tmp_path / "out")
    # the experiment folder holds run directories: the error points at them
    with pytest.raises(FileNotFoundError, match="pass those instead"):
        report([paper_runs[0].parent], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one run directory"):
        report([], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing drawn before every input checked


def test_run_directory_missing_a_column_is_refused(paper_runs: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "threshold"
    shutil.copytree(next(path for path in paper_runs if path.name == "threshold"), run)
    (stored,) = run.glob("timeseries.*")  # the format is runlog's business
    if stored.suffix == ".parquet":
        pd.read_parquet(stored).drop(columns=["ci_g_per_kwh"]).to_parquet(stored, index=False)
    else:
        pd.read_csv(stored).drop(columns=["ci_g_per_kwh"]).to_csv(stored, index=False)
    with pytest.raises(ValueError, match=r"timeseries\..*ci_g_per_kwh"):
        report([run], tmp_path / "out")


def test_import_has_no_side_effects() -> None:
    # matplotlib (and its backend choice) is loaded only when a figure is drawn
    code = (
        "import sys, curtail.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_formats_choose_the_file_types(paper_runs: list[Path], tmp_path: Path) -> None:
    paths = report(paper_runs[:1], tmp_path / "png", formats=["png"])
    assert paths and all(path.suffix == ".png" for path in paths)
    with pytest.raises(ValueError, match="choose from"):
        report(paper_runs[:1], tmp_path / "svg", formats=["svg"])
