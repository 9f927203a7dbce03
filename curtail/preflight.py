"""Preflight: what a real run needs on this machine, checked before Ray starts.

A run that would fail minutes in — a corpus file missing, an output folder under a regular
file, a cache that cannot be written — fails here instead, with one :class:`PreflightError`
naming the config key and the fix, and before any run folder exists. Traces and forecasts are
checked where they are loaded (:class:`~curtail.planning.traces.TraceError`); what the cluster
offers is checked right after connecting (:func:`curtail.runtime.cluster.check_capacity`).
The files are checked on the machine that runs ``curtail run``; on a multi-node cluster the
coordinator reads them on the head node, which under ``ray job submit`` is the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from curtail.config import ExperimentConfig, project_root
from curtail.errors import PreflightError


def resolve_data_path(path: Path) -> Path:
    """Relative corpus and cache paths: the working directory first, then the project root
    (the rule the coordinator applies when it reads them)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (project_root() / path).resolve()


def shard_location(location: str) -> str:
    """A shard folder's location as the run reads it: a URI as given, a path resolved."""
    from curtail.run_store import is_uri

    return location if is_uri(location) else str(resolve_data_path(Path(location)))


def unreadable_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (None if it can)."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"{path} is a folder, not a file"
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        return f"{path} cannot be read ({error.strerror or error})"
    return None


def unwritable_dir(path: Path) -> str | None:
    """Why a folder ``path`` cannot be written or created (None if it can): the nearest part
    of it that exists must be a folder this process may write into."""
    path = Path(path).absolute()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                return f"{existing} is a file, not a folder" + (f", so {path} cannot be created" if existing != path else "")
            if not os.access(existing, os.W_OK | os.X_OK):
                return f"{existing} is not writable"
            return None
    return f"{path} has no existing parent"  # pragma: no cover -- the root always exists


def check_run_files(experiment: ExperimentConfig) -> None:
    """Every file ``[training]`` reads exists and is readable, and its cache can be written."""
    training = experiment.training
    if training.fp8_linear:
        from curtail.training.float8 import require_torchao

        try:
            require_torchao()
        except ImportError as missing:
            raise PreflightError(f"training.fp8_linear: {missing}") from None
    if training.host_power == "codecarbon":
        from curtail.training.host_power import require_codecarbon

        try:
            require_codecarbon()
        except ImportError as missing:
            raise PreflightError(f"training.host_power: {missing}") from None
    problems = []
    if training.corpus_shards is not None:
        from curtail.errors import CorpusError
        from curtail.training.shards import load_manifest

        try:
            load_manifest(shard_location(training.corpus_shards))
        except CorpusError as error:
            problems.append(f"training.corpus_shards: {error}")
    else:
        for key, paths in (("training.corpus", training.corpus), ("training.heldout", training.heldout or [])):
            for index, path in enumerate(paths):
                if problem := unreadable_file(resolve_data_path(path)):
                    problems.append(f"{key}[{index}]: {problem}")
    if training.averager_actors > 1:
        from curtail.training.model import get_spec

        tensors = get_spec(training.preset).num_parameter_tensors
        key = "sync_fragments" if training.sync_fragments > 1 else "averager_shards"
        if training.averager_actors > tensors:
            problems.append(f"training.{key} = {training.averager_actors}: the {training.preset} model has "
                            f"{tensors} parameter tensors to share out; use at most {tensors}")
    cache = training.cache_dir if training.cache_dir.is_absolute() else resolve_data_path(training.cache_dir)
    if problem := unwritable_dir(cache):
        problems.append(f"training.cache_dir: {problem}")
    if problems:
        raise PreflightError("; ".join(problems) + ". Fix the paths in the config's [training] section "
                             "(relative paths are read from the working directory, then the project root)")


def check_live_files(experiment: ExperimentConfig) -> None:
    """A live experiment's trace files (a served trace, the fallback) load and hold every site's
    region, before any cluster starts (``TraceError`` names the file, the line and the fix)."""
    from curtail.config import TraceSource
    from curtail.planning.traces import load_trace

    live = experiment.live
    if live is None:
        return
    files = []
    if live.source.path is not None:
        files.append(("live.source", TraceSource(path=live.source.path, naive_timezone=live.source.naive_timezone)))
    if live.fallback_trace is not None:
        files.append(("live.fallback_trace", live.fallback_trace))
    regions = {experiment.sites[site].region for run in experiment.runs for site in run.sites}
    for key, source in files:
        served = load_trace(source).signals
        missing = sorted(r for r in regions if live.source.regions.get(r, r) not in served)
        if missing:
            raise PreflightError(
                f"{key}: {source.path} has no column for regions {missing} (it has {sorted(served)}); "
                "fix the sites' regions or map them with live.source.regions"
            )


def check_output_dir(path: Path, *, key: str = "output_dir") -> None:
    """The run directory can be created at (or under) ``path``."""
    if problem := unwritable_dir(path):
        raise PreflightError(f"{key}: {problem}; choose another output folder (--output-dir DIR)")
