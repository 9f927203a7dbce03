"""Whole-run checkpoints: what a resumed run needs, written atomically.

A checkpoint is a folder ``RUN_DIR/checkpoints/NNNNNN/`` holding the global weights and the
outer optimizer's momentum (safetensors: loading never executes code), and JSON for the rest:
the averaging actor's version counters, the data ledger, the executor's state machine
(sites, round, clock, the trajectory so far) and the coordinator's bookkeeping. The folder is
written under a temporary name and renamed into place, then ``LATEST`` is replaced atomically
to point at it, so a crash mid-write leaves the previous checkpoint intact. Each site's inner
optimizer state lives in its Ray Train checkpoints (``RUN_DIR/ray_train``) and comes back
when the site's worker group restarts under the same run name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINTS = "checkpoints"
KEEP = 2


@dataclass
class RunCheckpoint:
    path: Path
    params: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    averager: dict[str, Any]
    ledger: dict[str, Any]
    executor: dict[str, Any]
    coordinator: dict[str, Any]


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, default=float))


def write_checkpoint(
    run_dir: Path,
    sequence: int,
    *,
    averager_state: dict[str, Any],
    ledger_state: dict[str, Any],
    executor_state: dict[str, Any],
    coordinator_state: dict[str, Any],
) -> Path:
    """Write checkpoint ``sequence`` and point ``LATEST`` at it; keeps the newest two."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    optimizer = dict(averager_state["optimizer"])
    buffers = optimizer.pop("momentum_buffers", None)
    save_file({k: np.ascontiguousarray(v) for k, v in averager_state["params"].items()}, staging / "global.safetensors")
    if buffers:
        save_file({k: np.ascontiguousarray(v) for k, v in buffers.items()}, staging / "outer_momentum.safetensors")
    _write_json(staging / "outer_optimizer.json", optimizer)
    _write_json(staging / "averager.json", {k: averager_state[k] for k in ("version", "num_outer_steps")})
    _write_json(staging / "ledger.json", ledger_state)
    _write_json(staging / "executor.json", executor_state)
    _write_json(staging / "coordinator.json", coordinator_state)
    final = root / f"{sequence:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    pointer = root / ".LATEST.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "LATEST")
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def read_checkpoint(path: Path) -> RunCheckpoint:
    """Load a checkpoint folder written by :func:`write_checkpoint`."""
    path = Path(path)
    missing = [n for n in ("global.safetensors", "averager.json", "ledger.json", "executor.json") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (missing {missing}); resume from an earlier one")
    optimizer = json.loads((path / "outer_optimizer.json").read_text())
    momentum = path / "outer_momentum.safetensors"
    if momentum.is_file():
        optimizer["momentum_buffers"] = load_file(momentum)
    elif optimizer.get("name") == "nesterov":
        optimizer["momentum_buffers"] = {}
    return RunCheckpoint(
        path=path,
        params=load_file(path / "global.safetensors"),
        optimizer=optimizer,
        averager=json.loads((path / "averager.json").read_text()),
        ledger=json.loads((path / "ledger.json").read_text()),
        executor=json.loads((path / "executor.json").read_text()),
        coordinator=json.loads((path / "coordinator.json").read_text()),
    )
