"""Whole-run checkpoints: what a resumed run needs, written atomically.

A checkpoint is a folder ``RUN_DIR/checkpoints/NNNNNN/`` holding the global weights and the
outer optimizer's momentum (safetensors: loading never executes code), and JSON for the rest:
the averaging actor's version counters, the data ledger, the executor's state machine
(sites, round, clock, the trajectory so far) and the coordinator's bookkeeping. The folder is
written under a temporary name and renamed into place, then ``LATEST`` is replaced atomically
to point at it, so a crash mid-write leaves the previous checkpoint intact. Each site's inner
optimizer state lives in its Ray Train checkpoints (``RUN_DIR/ray_train``) and comes back
when the site's worker group restarts under the same run name.

Beside the checkpoints, the coordinator keeps an append-only **ledger journal**
(``RUN_DIR/ledger_journal.jsonl``, one fsync'd JSON line per event): the token ranges each
site trained, delivered into the global model, or lost with a failed site. A checkpoint
records how far the journal went; on resume, what the journal holds beyond that mark is
exactly the work lost with the crash, which the run then trains again (:func:`lost_since`).
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
INNER = "inner"
KEEP = 2
JOURNAL = "ledger_journal.jsonl"


@dataclass
class RunCheckpoint:
    path: Path
    params: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    averager: dict[str, Any]
    ledger: dict[str, Any]
    executor: dict[str, Any]
    coordinator: dict[str, Any]

    @property
    def inner_dir(self) -> Path | None:
        """The sites' inner optimizer states at this checkpoint (``inner/<site>/rank<r>.pt``)."""
        inner = self.path / INNER
        return inner if inner.is_dir() else None


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
    inner_dir: Path | None = None,
) -> Path:
    """Write checkpoint ``sequence`` and point ``LATEST`` at it; keeps the newest two.

    ``inner_dir`` (from :func:`inner_staging_dir`), where the sites saved their inner
    optimizer states for this checkpoint, moves into it as ``inner/``.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    if inner_dir is not None and Path(inner_dir).is_dir():
        os.replace(inner_dir, staging / INNER)
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
    for stale in root.glob(".inner-*"):  # left by a crash before its checkpoint was written
        if stale.name < inner_staging_dir(run_dir, sequence).name:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def inner_staging_dir(run_dir: Path, sequence: int) -> Path:
    """Where the sites save their inner optimizer states before checkpoint ``sequence``."""
    return Path(run_dir) / CHECKPOINTS / f".inner-{sequence:06d}"


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


# --------------------------------------------------------------------------------------------
# Ledger journal


class LedgerJournal:
    """Append-only, fsync'd JSON lines: ``{"seq", "kind", "site", "ranges": [[epoch, start,
    end], ...], "t_s", "wall"}`` with ``kind`` one of ``trained`` (a site computed these
    tokens), ``delivered`` (they entered the global model), ``released`` (lost with a failed
    site; they go back to the pool) and ``resume`` (a restart from a checkpoint)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / JOURNAL
        if self.path.is_file():  # drop a last line torn by a crash mid-write before appending
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as file:
                    file.truncate(data.rfind(b"\n") + 1)
        self.seq = max((entry["seq"] for entry in read_journal(self.path)), default=0)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- kept open for the run

    def append(self, kind: str, site: str = "", ranges: list[list[int]] | None = None, **details: Any) -> int:
        self.seq += 1
        entry = {"seq": self.seq, "kind": kind, "site": site, "ranges": ranges or [], **details}
        self._file.write(json.dumps(entry, default=float) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return self.seq

    def close(self) -> None:
        self._file.close()


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's entries; a line torn by a crash mid-write (the last one) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _add_interval(intervals: list[list[int]], start: int, end: int) -> None:
    """Add ``[start, end)`` to sorted disjoint intervals, merging what it touches."""
    touching = [iv for iv in intervals if iv[0] <= end and iv[1] >= start]
    kept = [iv for iv in intervals if not (iv[0] <= end and iv[1] >= start)]
    merged = [min([start] + [iv[0] for iv in touching]), max([end] + [iv[1] for iv in touching])]
    intervals[:] = sorted(kept + [merged])


def _remove_interval(intervals: list[list[int]], start: int, end: int) -> None:
    result = []
    for lo, hi in intervals:
        if hi <= start or lo >= end:
            result.append([lo, hi])
            continue
        if lo < start:
            result.append([lo, start])
        if hi > end:
            result.append([end, hi])
    intervals[:] = result


def lost_since(entries: list[dict[str, Any]], mark: int) -> dict[str, Any]:
    """What the journal holds beyond ``mark`` (the sequence a checkpoint recorded): the token
    ranges trained after the checkpoint and not already lost with a failed site — exactly
    the work a resume from that checkpoint discards and trains again.

    A ``resume`` entry after the mark raises it: an earlier restart from the same checkpoint
    already counted what came before it. Returns ``ranges`` (``[epoch, start, end]``, merged),
    ``tokens``, ``delivered_tokens`` (had reached the global model before the crash),
    ``site_failures`` (``[site, epoch, start, end]`` trained and lost with a failed site after the
    mark: the checkpoint's ledger does not know them, so a resume records them again),
    ``last_t_s`` and ``last_wall`` (the latest run-clock and wall instants journaled).
    """
    floor = mark
    for entry in entries:
        if entry["seq"] > floor and entry["kind"] == "resume":
            floor = entry["seq"]
    live: dict[int, list[list[int]]] = {}
    delivered: dict[int, list[list[int]]] = {}
    failed: list[list[Any]] = []
    last_t_s = last_wall = None
    for entry in sorted((e for e in entries if e["seq"] > floor), key=lambda e: e["seq"]):
        for epoch, start, end in entry["ranges"]:
            if entry["kind"] == "trained":
                _add_interval(live.setdefault(epoch, []), start, end)
            elif entry["kind"] == "delivered":
                _add_interval(delivered.setdefault(epoch, []), start, end)
            elif entry["kind"] == "released":  # its trained part was lost with the failed site
                failed += [[entry["site"], epoch, max(lo, start), min(hi, end)]
                           for lo, hi in live.get(epoch, []) if lo < end and hi > start]
                _remove_interval(live.setdefault(epoch, []), start, end)
                _remove_interval(delivered.setdefault(epoch, []), start, end)
        if entry.get("t_s") is not None:
            last_t_s = entry["t_s"] if last_t_s is None else max(last_t_s, entry["t_s"])
        if entry.get("wall") is not None:
            last_wall = entry["wall"] if last_wall is None else max(last_wall, entry["wall"])
    ranges = [[epoch, lo, hi] for epoch in sorted(live) for lo, hi in live[epoch]]
    delivered_tokens = 0
    for epoch, intervals in delivered.items():
        for lo, hi in intervals:  # delivered ∩ live
            delivered_tokens += sum(max(0, min(hi, b) - max(lo, a)) for a, b in live.get(epoch, []))
    return {
        "ranges": ranges,
        "tokens": sum(hi - lo for _, lo, hi in ranges),
        "delivered_tokens": delivered_tokens,
        "site_failures": failed,
        "last_t_s": last_t_s,
        "last_wall": last_wall,
    }


def audit_journal(run_dir: Path) -> dict[str, Any]:
    """Check a finished run directory: every token position the journal says was trained is
    in the final ledger (``ledger.json``) once, plus once more for each time the ledger
    records it as re-trained. ``mismatched_tokens`` counts positions where that fails (0 for
    a consistent run)."""
    run_dir = Path(run_dir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    deltas: dict[tuple[int, int], int] = {}  # (epoch, position) -> journal minus expected

    def add(epoch: int, start: int, end: int, sign: int) -> None:
        deltas[(epoch, start)] = deltas.get((epoch, start), 0) + sign
        deltas[(epoch, end)] = deltas.get((epoch, end), 0) - sign

    journal_tokens = 0
    for entry in read_journal(run_dir / JOURNAL):
        if entry["kind"] == "trained":
            for epoch, start, end in entry["ranges"]:
                add(epoch, start, end, +1)
                journal_tokens += end - start
    for record in ledger["epochs"]:
        for _site, start, end in record["trained"]:
            add(record["epoch"], start, end, -1)
    for _cause, epoch, start, end in ledger.get("retrained", []):
        add(epoch, start, end, -1)
    mismatched, level, previous = 0, 0, None
    for key in sorted(deltas):
        if previous is not None and previous[0] == key[0] and level:
            mismatched += key[1] - previous[1]
        level = level + deltas[key] if previous is None or previous[0] == key[0] else deltas[key]
        previous = key
    return {
        "mismatched_tokens": mismatched,
        "journal_trained_tokens": journal_tokens,
        "ledger_trained_tokens": sum(e - s for r in ledger["epochs"] for _, s, e in r["trained"]),
        "retrained_tokens": sum(e - s for _, _, s, e in ledger.get("retrained", [])),
    }
