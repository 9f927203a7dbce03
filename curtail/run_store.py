"""Where a run directory lives: a local folder, or object storage named by a URI.

A run directory may be a local path or any URI :mod:`pyarrow.fs` opens (``s3://bucket/runs``,
``gs://bucket/runs``, ``hdfs://...``): sites in different regions then share no network
volume, only the bucket. Filesystem options ride in the URI's query
(``s3://bucket/runs?endpoint_override=10.0.0.5:9000&scheme=http`` for an S3-compatible
server); credentials come from the environment or the machine's role as for any AWS/GCS
client (or ``s3://KEY:SECRET@bucket/...``, which curtail never prints).

A run on a URI keeps a **local working copy** on the driver's node (the coordinator and its
helpers run there and write files as they do on a local run) and makes the URI the durable
copy: every checkpoint is uploaded when written (its files, its ``manifest.json`` last, then
``LATEST``, then the run's top-level files: the ledger journal, the run spec, live readings),
and the whole run directory at the end. The sites write their own parts straight to the URI:
Ray Train's checkpoints (``ray_train/``) and the inner optimizer states a checkpoint asks for.
A resume from the URI (``curtail run --resume s3://...``) pulls the run directory into a fresh
working copy first, so any machine can continue a run.

:class:`RunStore` is the run's view of both; :func:`write_bytes` / :func:`read_bytes` are
what a site worker uses on a location string (a path or a URI).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs as pafs

from curtail.errors import StorageError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
MANIFEST = "manifest.json"
NOT_PULLED = ("ray_train", "model")  # a resume reads neither: Ray Train reads its own, the model is rewritten
MIRROR_ROOT = Path("runs") / ".remote"
"""Where working copies of runs on a URI go (relative to the working directory)."""


def is_uri(location: str | Path) -> bool:
    """A location with a scheme other than ``file://`` (``s3://``, ``gs://``, ...)."""
    scheme = urlsplit(str(location)).scheme
    return "://" in str(location) and len(scheme) > 1 and scheme != "file"


def redact(location: str) -> str:
    """The location with any ``user:secret@`` credentials left out (for messages and records)."""
    return re.sub(r"://[^/@]*@", "://", str(location))


def join(location: str, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query (filesystem options) at the end."""
    base, question, query = str(location).partition("?")
    path = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{path}{question}{query}"


def open_location(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path a location names (a plain path: the local filesystem)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as error:
        raise StorageError(f"{redact(str(location))}: not a storage location pyarrow.fs can open ({error}); use "
                           "a local folder or a URI such as s3://bucket/runs?endpoint_override=HOST:PORT") from None


def write_bytes(location: str, data: bytes) -> None:
    """Write a file at ``location`` whole: a reader never sees part of it (an object store's
    put is atomic; a local file is written beside and renamed)."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.tmp")
        staged.write_bytes(data)
        os.replace(staged, path)
        return
    filesystem, path = open_location(location)
    with filesystem.open_output_stream(path) as out:
        out.write(data)


def read_bytes(location: str) -> bytes | None:
    """The file at ``location`` (None if there is none)."""
    filesystem, path = open_location(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as source:
        return source.read()


def mirror_dir(uri: str) -> Path:
    """The working copy of the run directory at ``uri``: ``runs/.remote/<bucket>/<path>``."""
    parts = urlsplit(redact(uri))
    return (MIRROR_ROOT / parts.scheme / parts.netloc / parts.path.strip("/")).absolute()


@dataclass(frozen=True)
class RunStore:
    """A run directory: the local folder every process on the driver's node writes, and (for
    a run on a URI) the ``remote`` location that is its durable copy.

    Example::

        store = RunStore.at("s3://bucket/runs/demo/caiso?endpoint_override=127.0.0.1:9000&scheme=http")
        store.local                                   # runs/.remote/s3/bucket/runs/demo/caiso
        store.location(store.local / "ray_train")     # s3://bucket/runs/demo/caiso/ray_train?endpoint...
        store.push_checkpoint(store.local / "checkpoints" / "000003")
    """

    local: Path
    remote: str | None = None

    @classmethod
    def at(cls, location: str | Path) -> RunStore:
        """The run directory at ``location``: a local folder, or a URI with its working copy."""
        if is_uri(location):
            open_location(location)  # a bad URI is an error before anything is written
            return cls(mirror_dir(str(location)), str(location))
        return cls(Path(location).absolute())

    @property
    def name(self) -> str:
        """How the run directory is shown: its URI without credentials, or its folder."""
        return redact(self.remote) if self.remote is not None else str(self.local)

    def location(self, local_path: str | Path) -> str:
        """Where a process on another node finds ``local_path`` of this run directory."""
        if self.remote is None:
            return str(local_path)
        relative = Path(local_path).absolute().relative_to(self.local).as_posix()
        return join(self.remote, relative)

    # ------------------------------------------------------------------ the remote copy

    @functools.cached_property
    def _opened(self) -> tuple[pafs.FileSystem, str]:
        """The remote filesystem and root, opened once (an object store's open asks the server)."""
        assert self.remote is not None
        return open_location(self.remote)

    def _remote(self, relative: str = "") -> tuple[pafs.FileSystem, str]:
        filesystem, root = self._opened
        return filesystem, f"{root.rstrip('/')}/{relative}".rstrip("/")

    def exists(self) -> bool:
        """Whether the run directory holds anything (a remote one: any object under it)."""
        if self.remote is None:
            return self.local.exists() and any(self.local.iterdir())
        filesystem, root = self._remote()
        found = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
        return bool(found)

    def push(self, *relative: str) -> None:
        """Upload these files or folders of the working copy (no-op for a local run)."""
        if self.remote is None:
            return
        local = pafs.LocalFileSystem()
        for name in relative:
            source = self.local / name
            if not source.exists():
                continue
            filesystem, target = self._remote(name)
            try:
                pafs.copy_files(str(source), target, source_filesystem=local, destination_filesystem=filesystem)
            except OSError as error:
                raise StorageError(f"could not upload {name} to {self.name}: {error}") from None

    def push_top_level(self) -> None:
        """The run directory's own files (the ledger journal, the run spec, live records)."""
        if self.remote is not None and self.local.is_dir():
            self.push(*(p.name for p in sorted(self.local.iterdir()) if p.is_file()))

    def push_checkpoint(self, folder: Path) -> None:
        """Upload a written checkpoint: its files, ``manifest.json`` last (a half-uploaded one
        fails verification), then ``LATEST``, the top-level files, and remove the remote
        checkpoints the working copy no longer keeps."""
        if self.remote is None:
            return
        checkpoint = Path(folder)
        relative = f"{CHECKPOINTS}/{checkpoint.name}"
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST)
        self.push(*(f"{relative}/{p.relative_to(checkpoint).as_posix()}" for p in files))
        self.push(f"{relative}/{MANIFEST}", f"{CHECKPOINTS}/{LATEST}")
        self.push_top_level()
        kept = {p.name for p in (self.local / CHECKPOINTS).iterdir() if p.is_dir()}
        filesystem, root = self._remote(CHECKPOINTS)
        for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.isdigit() and info.base_name not in kept:
                filesystem.delete_dir(info.path)

    def push_run(self) -> None:
        """Upload the whole working copy (a run's end): checkpoints already went as written."""
        if self.remote is None:
            return
        self.push(*(p.name for p in sorted(self.local.iterdir()) if p.name != CHECKPOINTS))
        self.push(f"{CHECKPOINTS}/{LATEST}")

    def fetch(self, relative: str) -> Path:
        """Download ``relative`` (a file or folder) into the working copy; returns its local path."""
        target = self.local / relative
        if self.remote is None:
            return target
        filesystem, source = self._remote(relative)
        info = filesystem.get_file_info(source)
        if info.type == pafs.FileType.NotFound:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if info.type == pafs.FileType.Directory:  # the local folders its files go into
                target.mkdir(exist_ok=True)
                for entry in filesystem.get_file_info(pafs.FileSelector(source, recursive=True)):
                    if entry.type == pafs.FileType.File:
                        (target / entry.path[len(source):].lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(source, str(target), source_filesystem=filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
        except OSError as error:
            raise StorageError(f"could not download {relative} from {self.name}: {error}") from None
        return target

    def remove(self, relative: str) -> None:
        """Delete ``relative`` (a folder) from the remote copy, if it is there."""
        if self.remote is None:
            return
        filesystem, path = self._remote(relative)
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            filesystem.delete_dir(path)

    def pull(self) -> None:
        """Replace the working copy with the remote run directory (but ``ray_train/`` and the
        model): what a resume on any machine starts from."""
        if self.remote is None:
            return
        filesystem, root = self._remote()
        entries = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        if not entries:
            raise StorageError(f"{self.name}: no run directory there (nothing under that URI)")
        staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=self._mirror_parent()))
        try:
            for info in entries:
                if info.base_name in NOT_PULLED:
                    continue
                pafs.copy_files(info.path, str(staging / info.base_name), source_filesystem=filesystem,
                                destination_filesystem=pafs.LocalFileSystem())
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"could not download the run directory {self.name}: {error}") from None
        shutil.rmtree(self.local, ignore_errors=True)
        os.replace(staging, self.local)

    def _mirror_parent(self) -> Path:
        self.local.parent.mkdir(parents=True, exist_ok=True)
        return self.local.parent


class BackgroundUpload:
    """Uploads files of a run's working copy from one background thread as they change (the
    ledger journal after every entry): a request for a file already waiting is merged into it,
    so the upload keeps up however often the file changes. A failed upload is logged and left
    to the next request or checkpoint; :meth:`close` waits for what is queued."""

    def __init__(self, store: RunStore):
        self.store = store
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self.failures = 0

    def changed(self, relative: str) -> None:
        if self.store.remote is None:
            return
        with self._lock:
            if relative in self._waiting:
                return
            self._waiting.add(relative)
        self._thread.submit(self._upload, relative)

    def _upload(self, relative: str) -> None:
        with self._lock:
            self._waiting.discard(relative)
        try:
            self.store.push(relative)
        except StorageError as error:
            self.failures += 1
            log.warning("%s (retried with the next change or checkpoint)", error)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


__all__ = ["BackgroundUpload", "RunStore", "is_uri", "join", "mirror_dir", "open_location", "read_bytes", "redact", "write_bytes"]
