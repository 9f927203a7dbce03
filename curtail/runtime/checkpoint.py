"""Whole-run checkpoints: what a resumed run needs, written atomically.

A checkpoint is a folder ``RUN_DIR/checkpoints/NNNNNN/`` holding the global weights and the
outer optimizer's momentum (safetensors: loading never executes code) — one file of each per
averaging actor, written by that actor (``global.safetensors`` for one actor,
``global-00001-of-00002.safetensors``… for a sharded averager, listed in ``averager.json``), so
no process ever holds the whole state to checkpoint it — and JSON for the rest:
the averaging actor's version counters, the data ledger, the executor's state machine
(sites, round, clock, the trajectory so far) and the coordinator's bookkeeping, and
``manifest.json`` with the size and sha256 of every file in it. The folder is written under a
temporary name and renamed into place, then ``LATEST`` is replaced atomically to point at it,
so a crash mid-write leaves the previous checkpoint intact; the newest :data:`KEEP` are kept.
Each site's inner optimizer state lives in its Ray Train checkpoints (``RUN_DIR/ray_train``)
and comes back when the site's worker group restarts under the same run name.

A resume does not trust ``LATEST`` blindly: :func:`select_checkpoint` verifies the
checkpoint against its manifest (:func:`verify_checkpoint`) and falls back to the newest
intact one, saying which it skipped and why; with none intact while the journal records
trained work it refuses (a fresh start would drop that work from the run's accounting).

Beside the checkpoints, the coordinator keeps an append-only **ledger journal**
(``RUN_DIR/ledger_journal.jsonl``, one fsync'd JSON line per event): the token ranges each
site trained, delivered into the global model, or lost with a failed site. A checkpoint
records how far the journal went; on resume, what the journal holds beyond that mark is
exactly the work lost with the crash, which the run then trains again (:func:`lost_since`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from curtail.errors import CheckpointError, ResumeError
from curtail.run_store import is_uri, join, read_bytes, redact, write_bytes
from curtail.training.intervals import add_interval, remove_interval

CHECKPOINTS = "checkpoints"
INNER = "inner"
KEEP = 3  # the newest three: two to fall back to if the newest is damaged
JOURNAL = "ledger_journal.jsonl"
MANIFEST = "manifest.json"  # inside a checkpoint folder: every file's size and sha256
MANIFEST_FORMAT = 1
REQUIRED = ("outer_optimizer.json", "averager.json", "ledger.json", "executor.json", "coordinator.json")


@dataclass
class RunCheckpoint:
    path: Path
    optimizer: dict[str, Any]  # the outer optimizer's settings and counters, without its momentum buffers
    averager: dict[str, Any]
    ledger: dict[str, Any]
    executor: dict[str, Any]
    coordinator: dict[str, Any]

    @property
    def inner_dir(self) -> Path | None:
        """The sites' inner optimizer states at this checkpoint (``inner/<site>/rank<r>.pt``)."""
        inner = self.path / INNER
        return inner if inner.is_dir() else None

    @property
    def parts(self) -> list[tuple[str, str | None]]:
        """Each averaging actor's ``(weights file, momentum file or None)``, in actor order."""
        weights, momentum = weight_files(self.averager, self.path)
        return [(name, momentum[index] if momentum else None) for index, name in enumerate(weights)]

    def part_names(self, index: int) -> set[str]:
        """The parameter names in part ``index`` (read from its file's header only)."""
        with safe_open(self.path / self.parts[index][0], framework="numpy") as file:
            return set(file.keys())

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The whole global weights, every part loaded (a resume loads each part in its actor)."""
        return {name: value for weights, _ in self.parts for name, value in load_file(self.path / weights).items()}

    def outer_optimizer_state(self) -> dict[str, Any]:
        """The whole outer optimizer's state, every part's momentum loaded."""
        buffers = [load_file(self.path / momentum) for _, momentum in self.parts if momentum is not None]
        return outer_optimizer_state(self.optimizer, {k: v for part in buffers for k, v in part.items()}
                                     if buffers else None)


def part_file_names(index: int, count: int) -> tuple[str, str]:
    """The weights' and the outer momentum's file names of averaging actor ``index`` of ``count``."""
    suffix = "" if count == 1 else f"-{index + 1:05d}-of-{count:05d}"
    return f"global{suffix}.safetensors", f"outer_momentum{suffix}.safetensors"


def weight_files(averager: dict[str, Any], path: Path) -> tuple[list[str], list[str]]:
    """The weights' and the momentum's files a checkpoint's ``averager.json`` lists (a checkpoint
    of one actor written before the list existed: ``global.safetensors`` and, if there,
    ``outer_momentum.safetensors``)."""
    files = averager.get("files")
    if files is None:
        return ["global.safetensors"], ["outer_momentum.safetensors"] if (path / "outer_momentum.safetensors").is_file() else []
    return list(files["global"]), list(files["outer_momentum"])


def outer_optimizer_state(optimizer: dict[str, Any], buffers: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The outer optimizer's ``load_state_dict`` input from its JSON part and its momentum (None:
    no file; Nesterov before its first step has empty buffers)."""
    if buffers is not None:
        return {**optimizer, "momentum_buffers": buffers}
    return {**optimizer, "momentum_buffers": {}} if optimizer.get("name") == "nesterov" else dict(optimizer)


def write_averager_part(folder: str | Path, state: dict[str, Any], index: int = 0, count: int = 1) -> dict[str, Any]:
    """Write one averaging actor's weights and outer momentum into ``folder`` (a path or a URI);
    returns the rest of its state for ``averager.json``: version, outer steps, the optimizer's
    settings and the files written. Each file is whole or absent (written beside and renamed)."""
    weights, momentum = part_file_names(index, count)
    optimizer = dict(state["optimizer"])
    buffers = optimizer.pop("momentum_buffers", None)
    _save_tensors(folder, weights, state["params"])
    files = {"global": [weights], "outer_momentum": []}
    if buffers:
        _save_tensors(folder, momentum, buffers)
        files["outer_momentum"].append(momentum)
    return {"version": int(state["version"]), "num_outer_steps": int(state["num_outer_steps"]),
            "optimizer": optimizer, "files": files}


def join_averager_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The averaging actors' :func:`write_averager_part` results as one (what ``averager.json`` holds)."""
    versions = {part["version"] for part in parts}
    if len(versions) != 1:
        raise CheckpointError(f"the averaging actors saved different versions {sorted(versions)}: not one state")
    return {**parts[0], "files": {kind: [name for part in parts for name in part["files"][kind]]
                                  for kind in ("global", "outer_momentum")}}


def read_tensors(location: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file at a path or a URI."""
    if not is_uri(location):
        return load_file(Path(location))
    data = read_bytes(str(location))
    if data is None:
        raise CheckpointError(f"{redact(str(location))} is missing")
    return safetensors.numpy.load(data)


def _save_tensors(folder: str | Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
    if is_uri(folder):
        write_bytes(join(str(folder), name), safetensors.numpy.save(arrays))
        return
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{name}.tmp")
    save_file(arrays, staged)
    os.replace(staged, path)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, default=float))


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, sequence: int) -> None:
    """Size and sha256 of every file in ``folder`` (``inner/`` too), written last."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(folder.rglob("*")) if path.is_file()
    }
    _write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "sequence": sequence, "files": files})


def write_checkpoint(
    run_dir: Path,
    sequence: int,
    *,
    averager_state: dict[str, Any],
    ledger_state: dict[str, Any],
    executor_state: dict[str, Any],
    coordinator_state: dict[str, Any],
    inner_dir: Path | None = None,
    averager_dir: Path | None = None,
) -> Path:
    """Write checkpoint ``sequence`` and point ``LATEST`` at it; keeps the newest :data:`KEEP`.

    ``averager_state``: the averaging actor's whole state (weights and momentum as arrays,
    written here as one part), or, with ``averager_dir``, what :func:`join_averager_parts`
    returned for the parts the actors wrote into that folder (moved in here).
    ``inner_dir`` (from :func:`inner_staging_dir`), where the sites saved their inner
    optimizer states for this checkpoint, moves into it as ``inner/``.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    if inner_dir is not None and Path(inner_dir).is_dir():
        os.replace(inner_dir, staging / INNER)
    if averager_dir is None:
        averager_state = write_averager_part(staging, averager_state)
    else:
        for name in [*averager_state["files"]["global"], *averager_state["files"]["outer_momentum"]]:
            os.replace(Path(averager_dir) / name, staging / name)
        shutil.rmtree(averager_dir, ignore_errors=True)
    _write_json(staging / "outer_optimizer.json", averager_state["optimizer"])
    _write_json(staging / "averager.json", {k: averager_state[k] for k in ("version", "num_outer_steps", "files")})
    _write_json(staging / "ledger.json", ledger_state)
    _write_json(staging / "executor.json", executor_state)
    _write_json(staging / "coordinator.json", coordinator_state)
    _write_manifest(staging, sequence)
    final = root / f"{sequence:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    point_latest(run_dir, final)
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for kind, staged in ((".inner-", inner_staging_dir), (".averager-", averager_staging_dir)):
        for stale in root.glob(f"{kind}*"):  # left by a crash before its checkpoint was written
            if stale.name < staged(run_dir, sequence).name:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def inner_staging_dir(run_dir: Path, sequence: int) -> Path:
    """Where the sites save their inner optimizer states before checkpoint ``sequence``."""
    return Path(run_dir) / CHECKPOINTS / f".inner-{sequence:06d}"


def averager_staging_dir(run_dir: Path, sequence: int) -> Path:
    """Where the averaging actors write their parts before checkpoint ``sequence``."""
    return Path(run_dir) / CHECKPOINTS / f".averager-{sequence:06d}"


def point_latest(run_dir: Path, checkpoint: Path) -> None:
    """Make ``LATEST`` name ``checkpoint`` (atomically): the checkpoint the run's state descends from."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / ".LATEST.tmp"
    pointer.write_text(Path(checkpoint).name)
    os.replace(pointer, root / "LATEST")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``LATEST`` names, unverified (None if there is none); a resume uses
    :func:`select_checkpoint` instead."""
    pointer = Path(run_dir) / CHECKPOINTS / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _loads(path: Path) -> str | None:
    """Why the checkpoint file ``path`` does not load (None if it does)."""
    try:
        if path.name.endswith(".safetensors"):
            with safe_open(path, framework="numpy") as file:
                for key in file.keys():  # noqa: SIM118 -- safe_open is not iterable
                    file.get_tensor(key)
        elif path.name.endswith(".json"):
            json.loads(path.read_text())
    except (SafetensorError, ValueError, OSError) as error:
        return f"{path.name} does not load ({_first_line(error)})"
    return None


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with the checkpoint folder ``path``: one line per problem, [] if intact.

    Every file its ``manifest.json`` lists must be there with its size and sha256, and the
    files a resume reads must be listed. A checkpoint without a manifest (written by an older
    curtail) is checked by loading its files.
    """
    path = Path(path)
    if not path.is_dir():
        return ["the folder is missing"]
    if not (path / MANIFEST).is_file():
        missing = [f"{name} is missing" for name in REQUIRED if not (path / name).is_file()]
        needed = [*REQUIRED, *_listed_weights(path)]
        missing += [f"{name} is missing" for name in needed[len(REQUIRED):] if not (path / name).is_file()]
        return missing or [problem for name in needed if (problem := _loads(path / name))]
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        expected_sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, OSError) as error:
        return [f"{MANIFEST} is unreadable ({_first_line(error)})"]
    problems = [f"{name} is not in {MANIFEST}" for name in [*REQUIRED, *_listed_weights(path)] if name not in files]
    for name, expected_bytes in sorted(expected_sizes.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif (size := file.stat().st_size) != expected_bytes:
            what = "truncated" if size < expected_bytes else "longer than written"
            problems.append(f"{name} is {what} ({size:,} of {expected_bytes:,} bytes)")
        elif sha256_file(file) != files[name]["sha256"]:
            problems.append(f"{name} does not match its sha256 in {MANIFEST}")
    return problems


def _listed_weights(path: Path) -> list[str]:
    """The weight and momentum files ``averager.json`` lists ([] where it does not load: reported elsewhere)."""
    try:
        weights, momentum = weight_files(json.loads((path / "averager.json").read_text()), path)
    except (ValueError, KeyError, TypeError, OSError):
        return []
    return [*weights, *momentum]


def checkpoint_names(run_dir: Path) -> list[str]:
    """The run's checkpoint folders, newest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def journal_trained_tokens(run_dir: Path) -> int:
    """Tokens the run's ledger journal says were trained (0 without a journal)."""
    return sum(end - start for entry in read_journal(Path(run_dir) / JOURNAL) if entry["kind"] == "trained"
               for _epoch, start, end in entry["ranges"])


def select_checkpoint(
    run_dir: Path, sequence: int | str | None = None
) -> tuple[Path | None, list[tuple[str, str]]]:
    """The checkpoint a resume of ``run_dir`` starts from, verified, and those passed over.

    Without ``sequence``: the one ``LATEST`` names if it is intact, else the newest intact
    folder. ``skipped`` lists ``(name, reason)`` for each passed over (``LATEST`` naming a
    missing folder, a truncated or corrupt file, a missing JSON). ``(None, skipped)`` when none
    is intact and the run's journal records no trained work: nothing is lost by starting over.
    With ``sequence`` (``4`` or ``"000004"``): that checkpoint, else :class:`CheckpointError`.

    Raises :class:`ResumeError` when no checkpoint is intact but the journal records trained
    work: a fresh start would silently drop it, its energy and CO2, from the run's accounting.

    Example::

        path, skipped = select_checkpoint("runs/demo/curtailment-aware")
        # (.../checkpoints/000011, [("000012", "global.safetensors is truncated (96 of 41,048 bytes)")])
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    names = checkpoint_names(run_dir)
    if sequence is not None:
        name = f"{int(sequence):06d}"
        problems = verify_checkpoint(root / name)
        if problems:
            raise CheckpointError(
                f"checkpoint {name} of {run_dir} cannot be resumed from: {'; '.join(problems)} "
                f"(its checkpoints: {', '.join(names) or 'none'})"
            )
        return root / name, []
    skipped: list[tuple[str, str]] = []
    pointer = root / "LATEST"
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in names:
            names.remove(named)
            names.insert(0, named)
        else:
            skipped.append((named or "LATEST", "LATEST names it, but the folder is missing"))
    for name in names:
        problems = verify_checkpoint(root / name)
        if not problems:
            return root / name, skipped
        skipped.append((name, "; ".join(problems)))
    trained = journal_trained_tokens(run_dir)
    if trained:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped) or "none was written"
        raise ResumeError(
            f"{run_dir} has no intact checkpoint to resume from ({reasons}), but its {JOURNAL} "
            f"records {trained:,} trained tokens: starting over would drop them, and their energy "
            "and CO2, from the run's accounting. Start a new run instead (curtail run CONFIG)"
        )
    return None, skipped


def read_checkpoint(path: Path) -> RunCheckpoint:
    """Load a checkpoint folder written by :func:`write_checkpoint`.

    A missing or unloadable file raises :class:`CheckpointError` naming it, at once (a
    corrupt file is not retried); :func:`select_checkpoint` picks a checkpoint that loads.
    """
    path = Path(path)
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {', '.join(missing)}); resume "
                              "from an earlier one: curtail run --resume RUN_DIR --checkpoint N")

    def unreadable(name: str, error: BaseException) -> CheckpointError:
        return CheckpointError(f"{path / name} is unreadable ({_first_line(error)}); resume from an "
                               "earlier checkpoint: curtail run --resume RUN_DIR --checkpoint N")

    def load(name: str) -> Any:
        try:
            return json.loads((path / name).read_text())
        except (ValueError, OSError) as error:
            raise unreadable(name, error) from None

    averager = load("averager.json")
    for name in [n for part in weight_files(averager, path) for n in part]:  # headers only: the actors load the data
        try:
            with safe_open(path / name, framework="numpy"):
                pass
        except (SafetensorError, ValueError, OSError) as error:
            raise unreadable(name, error) from None
    return RunCheckpoint(
        path=path,
        optimizer=load("outer_optimizer.json"),
        averager=averager,
        ledger=load("ledger.json"),
        executor=load("executor.json"),
        coordinator=load("coordinator.json"),
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


def lost_since(entries: list[dict[str, Any]], mark: int) -> dict[str, Any]:
    """What the journal holds beyond ``mark`` (the sequence a checkpoint recorded): the token
    ranges trained after the checkpoint and not already lost with a failed site — exactly
    the work a resume from that checkpoint discards and trains again.

    The entries after the mark are read life by life (a ``resume`` entry starts a new one):
    an earlier restart that never reached a newer checkpoint recorded what it lost in a ledger
    that is itself lost now, so its work — and the work before it — counts again, once per
    time it was trained (ranges of different lives may overlap). Returns ``ranges``
    (``[epoch, start, end]``, merged within a life), ``tokens``, ``delivered_tokens`` (had
    reached the global model before the crash), ``site_failures`` (``[site, epoch, start,
    end]`` trained and lost with a failed site after the mark: the checkpoint's ledger does
    not know them, so a resume records them again), ``last_t_s`` and ``last_wall`` (the latest
    run-clock and wall instants journaled).
    """
    lives: list[list[dict[str, Any]]] = [[]]
    for entry in sorted((e for e in entries if e["seq"] > mark), key=lambda e: e["seq"]):
        if entry["kind"] == "resume":
            lives.append([])
        else:
            lives[-1].append(entry)
    ranges: list[list[int]] = []
    failed: list[list[Any]] = []
    delivered_tokens = 0
    for life in lives:
        live: dict[int, list[list[int]]] = {}
        delivered: dict[int, list[list[int]]] = {}
        for entry in life:
            for epoch, start, end in entry["ranges"]:
                if entry["kind"] == "trained":
                    add_interval(live.setdefault(epoch, []), start, end)
                elif entry["kind"] == "delivered":
                    add_interval(delivered.setdefault(epoch, []), start, end)
                elif entry["kind"] == "released":  # its trained part was lost with the failed site
                    failed += [[entry["site"], epoch, max(lo, start), min(hi, end)]
                               for lo, hi in live.get(epoch, []) if lo < end and hi > start]
                    remove_interval(live.setdefault(epoch, []), start, end)
                    remove_interval(delivered.setdefault(epoch, []), start, end)
        ranges += [[epoch, lo, hi] for epoch in sorted(live) for lo, hi in live[epoch]]
        for epoch, intervals in delivered.items():
            for lo, hi in intervals:  # delivered ∩ live
                delivered_tokens += sum(max(0, min(hi, b) - max(lo, a)) for a, b in live.get(epoch, []))
    after = [e for e in entries if e["seq"] > mark]
    t_s = [e["t_s"] for e in after if e.get("t_s") is not None]
    wall = [e["wall"] for e in after if e.get("wall") is not None]
    return {
        "ranges": ranges,
        "tokens": sum(hi - lo for _, lo, hi in ranges),
        "delivered_tokens": delivered_tokens,
        "site_failures": failed,
        "last_t_s": max(t_s, default=None),
        "last_wall": max(wall, default=None),
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
