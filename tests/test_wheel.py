"""The built wheel, installed into a fresh virtual environment, works outside the checkout:
``curtail simulate`` and the main job's config from an empty folder, ``curtail init``.

The venv gets the wheel alone (``--no-deps``); its dependencies come from this test
environment's site-packages through a ``.pth`` file, so the test needs no network and checks
exactly what the wheel carries: the package, its console script and its example data."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its ``bin`` folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("curtail-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / "bin"
    site = Path(subprocess.run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch, ray, ... from here
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return bin_dir


def run_curtail(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "curtail"), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_the_wheel_simulates_the_paper_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    done = run_curtail(installed, "simulate", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {s["run"]: s for s in json.loads(done.stdout)}
    assert summaries["threshold"]["completed"] and summaries["threshold"]["emissions_kg"] == pytest.approx(1.41, abs=0.01)
    assert (tmp_path / "runs" / "paper" / "threshold" / "emissions.csv").is_file()
    # the package imported is the installed one, not the checkout
    where = subprocess.run([str(installed / "python"), "-c", "import curtail; print(curtail.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(installed.parent) in where and str(REPO) not in where


@pytest.mark.slow
def test_init_writes_examples_that_run_and_the_main_jobs_config_is_found(installed: Path, tmp_path: Path) -> None:
    done = run_curtail(installed, "init", "project", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    project = tmp_path / "project"
    assert (project / "experiments" / "demo.toml").is_file()
    assert (project / "data" / "traces" / "watttime_moer_2026-01-11_4regions.csv").is_file()
    assert (project / "data" / "text" / "tinyshakespeare.txt").is_file()
    done = run_curtail(installed, "simulate", "experiments/demo.toml", "--json", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)[0]["completed"]
    again = run_curtail(installed, "init", "project", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("curtail: error:") and "--force" in again.stderr
    # the main job's default config (curtail run with no argument) resolves from any folder
    code = "from curtail.examples import example_config; from curtail.config import load_experiment; " \
           "print(load_experiment(example_config('experiments/demo.toml')).name)"
    found = subprocess.run([str(installed / "python"), "-c", code], check=False, cwd=tmp_path, capture_output=True,
                           text=True)
    assert found.stdout.strip() == "demo", found.stderr[-2000:]
