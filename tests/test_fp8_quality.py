"""The float8 benchmark (experiments/fp8_quality.py): its CPU path and the ceiling it reports."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    return importlib.import_module("fp8_quality")


def test_the_ceiling_replaces_the_measured_casts_by_their_bandwidth_floor() -> None:
    script = load_script()
    bf16 = {"precision": "bf16", "seed": 0, "profile": {script.TRITON: 0.0915, "wall_s": 0.437}}
    fp8 = {"precision": "fp8", "seed": 0, "profile": {script.TRITON: 0.158, "wall_s": 0.407,
                                                      "float8_cast_roofline_s": [0.027, 0.046]}}
    unprofiled = {"precision": "fp8-rowwise", "seed": 0}
    script.add_ceilings([bf16, fp8, unprofiled], tokens_per_step=32_768)
    assert fp8["float8_casts_measured_s"] == pytest.approx(0.0665)
    assert fp8["ceiling_tokens_per_s"] == pytest.approx(65_536 / (0.407 - 0.0665 + 0.027))
    assert "ceiling_tokens_per_s" not in unprofiled and "ceiling_tokens_per_s" not in bf16


def test_cpu_run_through_fsdp_trains_both_precisions_on_the_same_batches(tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    command = [sys.executable, str(REPO / "experiments" / "fp8_quality.py"), "--text",
               str(REPO / "data" / "text" / "tinyshakespeare.txt"), "--preset", "tiny", "--steps", "8",
               "--warmup", "2", "--tail", "4", "--batch-size", "4", "--micro", "2", "--parallelism", "fsdp",
               "--output-dir", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallelism"] == "fsdp"
    bf16, fp8 = summary["runs"]
    assert (bf16["float8_layers"], fp8["float8_layers"]) == (0, 14)
    assert abs(fp8["tail_gap"]) < 0.02 and fp8["tail_gap"] != 0  # the same function, in float8
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,loss_bf16,loss_fp8" and len(rows) == 9
    first = rows[1].split(",")
    assert float(first[1]) == pytest.approx(float(first[2]), rel=1e-3)  # same weights, same batch


def test_each_run_is_compared_with_the_first_precision_from_its_own_seed() -> None:
    script = load_script()
    runs = [{"precision": "bf16", "seed": 0, "tail_gap": 0.0}, {"precision": "fp8", "seed": 0, "tail_gap": 0.02},
            {"precision": "bf16", "seed": 1, "tail_gap": 0.0}, {"precision": "fp8", "seed": 1, "tail_gap": -0.01}]
    assert script.baseline_of(runs[3], runs) is runs[2] and script.baseline_of(runs[1], runs) is runs[0]
    gaps = script.tail_gaps(runs)
    assert gaps == {"fp8": {"seeds": 2, "mean": pytest.approx(0.005), "min": -0.01, "max": 0.02}}


def test_cpu_run_over_two_seeds_keeps_the_batches_and_changes_the_initial_weights(tmp_path: Path) -> None:
    out = tmp_path / "fp8"
    command = [sys.executable, str(REPO / "experiments" / "fp8_quality.py"), "--text",
               str(REPO / "data" / "text" / "tinyshakespeare.txt"), "--preset", "tiny", "--steps", "6",
               "--warmup", "1", "--tail", "3", "--batch-size", "2", "--seeds", "0", "1", "--output-dir", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["precision"], r["seed"]) for r in summary["runs"]] == [("bf16", 0), ("fp8", 0), ("bf16", 1), ("fp8", 1)]
    gaps = [r["tail_gap"] for r in summary["runs"]]
    assert gaps[0] == gaps[2] == 0.0  # each seed's bf16 is its own reference
    assert summary["tail_gaps"]["fp8"]["seeds"] == 2
    assert summary["tail_gaps"]["fp8"]["mean"] == pytest.approx((gaps[1] + gaps[3]) / 2)
    assert len(summary["corpus_sha256"]) == 64
    rows = [row.split(",") for row in (out / "losses.csv").read_text().splitlines()]
    assert rows[0] == ["step", "loss_bf16_seed0", "loss_fp8_seed0", "loss_bf16_seed1", "loss_fp8_seed1"]
    first = [float(value) for value in rows[1][1:]]
    assert first[0] == pytest.approx(first[1], rel=1e-3) and first[2] == pytest.approx(first[3], rel=1e-3)
    assert first[0] != first[2]  # another seed, other initial weights, the same first batch
