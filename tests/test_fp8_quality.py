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
    bf16 = {"precision": "bf16", "profile": {script.TRITON: 0.0915, "wall_s": 0.437}}
    fp8 = {"precision": "fp8", "profile": {script.TRITON: 0.158, "wall_s": 0.407,
                                           "float8_cast_roofline_s": [0.027, 0.046]}}
    unprofiled = {"precision": "fp8-rowwise"}
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
