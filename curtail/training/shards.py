"""Token shards: a tokenized corpus as fixed-size files, on disk or object storage, read lazily.

``curtail prepare-data`` (:mod:`curtail.training.prepare`) writes a **shard folder**::

    manifest.json          the index: shards in order with their token counts and sha256, the
                           token dtype, the tokenizer's sha256, where the held-out part starts
    tokenizer/             the tokenizer the shards were encoded with (``save_pretrained``)
    00000-00000.bin ...    token ids, raw little-endian uint16 / uint32, ``shard_tokens`` each
                           (a source file's last shard may be shorter)

The corpus is the shards' tokens in manifest order. Position ``p`` lives in the shard whose
``[start, start + num_tokens)`` holds it, at offset ``p - start`` (:meth:`ShardManifest.locate`),
so the data ledger's ranges of positions are (shard, offset) ranges through this index and
keep their guarantees (disjoint, exactly once) unchanged. Training positions are
``[0, heldout_start)``, held-out ones ``[heldout_start, num_tokens)``.

:class:`ShardedTokens` is a 1-D array-like over that stream (``len``, ``dtype``, slicing) that
maps a shard only when a slice first touches it and keeps at most ``max_mapped_shards`` mapped,
so :class:`~curtail.training.data.TokenCorpus` reads it like an in-memory array while a rank's
memory stays the pages of a few shards, whatever the corpus size. A shard folder on object
storage (any :mod:`pyarrow.fs` URI, e.g. the run's bucket) is fetched one shard at a time into
a node-local cache on first touch, its sha256 checked; shards unmapped leave the cache again.

Example::

    train = ShardedTokens.open("data/shards/wikitext").train()
    corpus = TokenCorpus(train, "train")          # batches read two shards at most
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curtail.errors import CorpusError
from curtail.run_store import is_uri, join, open_location, read_bytes, redact

FORMAT = "curtail-token-shards/1"
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "curtail-shards"
"""Where shards fetched from object storage wait while mapped (one folder per process)."""


class SourceEntry(BaseModel):
    """One input file of the corpus."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    format: Literal["text", "json", "parquet"]
    num_bytes: int = Field(ge=0)
    heldout: bool = False  # a separate held-out file (tokenized after every training file)


class ShardEntry(BaseModel):
    """One shard file: its tokens in corpus order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    num_tokens: int = Field(ge=1)
    sha256: str
    source: int = Field(ge=0, description="index into the manifest's sources")


class ShardManifest(BaseModel):
    """What a shard folder holds (``manifest.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["curtail-token-shards/1"] = FORMAT
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(ge=1, description="len(tokenizer)")
    tokenizer_sha256: str
    shard_tokens: int = Field(ge=1, description="tokens per full shard")
    eos_between_documents: bool = Field(description="json/parquet documents end with the end-of-text token")
    sources: list[SourceEntry]
    shards: list[ShardEntry] = Field(min_length=1)
    heldout_start: int = Field(ge=2, description="first held-out token position")

    @model_validator(mode="after")
    def _heldout_inside(self) -> ShardManifest:
        if not self.heldout_start <= self.num_tokens - 2:
            raise ValueError(f"heldout_start {self.heldout_start} leaves fewer than 2 of {self.num_tokens} tokens held out")
        if any(shard.source >= len(self.sources) for shard in self.shards):
            raise ValueError("a shard names a source index the manifest does not list")
        return self

    @cached_property
    def starts(self) -> np.ndarray:
        """Each shard's first corpus position, and the corpus length last (``int64 [shards + 1]``)."""
        return np.concatenate([[0], np.cumsum([shard.num_tokens for shard in self.shards])]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def __eq__(self, other: object) -> bool:  # the fields only (not the cached index)
        return isinstance(other, ShardManifest) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    @property
    def identity(self) -> str:
        """A short content hash: two folders with equal identity hold the same token stream."""
        body = json.dumps([self.dtype, self.tokenizer_sha256, [s.sha256 for s in self.shards], self.heldout_start])
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def locate(self, position: int) -> tuple[int, int]:
        """``(shard index, offset in that shard)`` of a corpus position."""
        if not 0 <= position < self.num_tokens:
            raise IndexError(f"position {position} is outside the corpus [0, {self.num_tokens})")
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return shard, position - int(self.starts[shard])

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def load_manifest(location: str | Path) -> ShardManifest:
    """The manifest of the shard folder at ``location`` (a path or a URI), or a clear error."""
    raw = read_bytes(join(str(location), MANIFEST_NAME))
    if raw is None:
        raise CorpusError(f"{redact(str(location))} holds no {MANIFEST_NAME}; write a shard folder there with "
                          "`curtail prepare-data FILES... --output FOLDER`")
    try:
        return ShardManifest.model_validate_json(raw)
    except ValidationError as error:
        raise CorpusError(f"{redact(str(location))}/{MANIFEST_NAME} is not a curtail shard manifest ({error}); "
                          "rewrite the folder with `curtail prepare-data`") from None


def tokenizer_folder(location: str | Path, cache_dir: Path | None = None,
                     manifest: ShardManifest | None = None) -> Path:
    """The shard folder's ``tokenizer/`` as a local folder (fetched into the cache from a URI;
    pass the folder's ``manifest`` if it is already read)."""
    if not is_uri(location):
        return Path(location) / TOKENIZER_DIR
    import pyarrow.fs as pafs

    manifest = manifest or load_manifest(location)
    target = (cache_dir or DEFAULT_CACHE) / manifest.identity / TOKENIZER_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    if not (target / "tokenizer.json").is_file():
        filesystem, path = open_location(join(str(location), TOKENIZER_DIR))
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
        pafs.copy_files(path, str(staging), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(staging, target)
        except OSError:  # another process fetched it first: the same files
            shutil.rmtree(staging, ignore_errors=True)
    return target


class ShardedTokens:
    """The token stream of a shard folder between two positions, as a read-only 1-D array-like.

    ``tokens[a:b]`` returns a fresh ``numpy`` array (never a view into a mapping), so a shard can
    be unmapped as soon as newer shards push it out. Pickles as its location, manifest and
    range (what a Ray worker receives), never as token data.
    """

    ndim = 1

    def __init__(self, location: str | Path, manifest: ShardManifest, start: int = 0, end: int | None = None,
                 cache_dir: Path | None = None, max_mapped_shards: int = 4):
        self.location = str(location)
        self.manifest = manifest
        self.start = start
        self.end = manifest.num_tokens if end is None else end
        if not 0 <= self.start <= self.end <= manifest.num_tokens:
            raise ValueError(f"range [{start}, {end}) is outside the corpus [0, {manifest.num_tokens})")
        self.cache_dir = cache_dir
        self.max_mapped_shards = max_mapped_shards
        self._mapped: OrderedDict[int, np.memmap] = OrderedDict()
        self._fetched: dict[int, Path] = {}

    @classmethod
    def open(cls, location: str | Path, **options: Any) -> ShardedTokens:
        """All tokens of the shard folder at ``location`` (a local path or a pyarrow.fs URI)."""
        return cls(location, load_manifest(location), **options)

    def train(self) -> ShardedTokens:
        """The training positions ``[0, heldout_start)``."""
        return self.view(0, self.manifest.heldout_start)

    def heldout(self) -> ShardedTokens:
        """The held-out positions ``[heldout_start, num_tokens)``."""
        return self.view(self.manifest.heldout_start, self.manifest.num_tokens)

    def view(self, start: int, end: int) -> ShardedTokens:
        """Corpus positions ``[start, end)`` (absolute, not relative to this view)."""
        return ShardedTokens(self.location, self.manifest, start, end, self.cache_dir, self.max_mapped_shards)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype)

    @property
    def shape(self) -> tuple[int]:
        return (self.end - self.start,)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens reads contiguous slices only (tokens[a:b])")
        first, last, _ = index.indices(len(self))
        first, last = self.start + first, self.start + max(last, first)
        pieces = []
        position = first
        while position < last:
            shard, offset = self.manifest.locate(position)
            take = min(last - position, self.manifest.shards[shard].num_tokens - offset)
            pieces.append(np.array(self._map(shard)[offset : offset + take]))
            position += take
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def __repr__(self) -> str:
        return (f"ShardedTokens({redact(self.location)!r}, [{self.start}, {self.end}) of "
                f"{len(self.manifest.shards)} shards)")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mapped"], state["_fetched"] = OrderedDict(), {}
        return state

    def __del__(self) -> None:
        for shard in list(getattr(self, "_fetched", ())):  # (an __init__ that raised set none)
            self._release(shard)

    def verify(self) -> None:
        """Check every shard of the folder against its size and sha256 (reads the whole corpus)."""
        for index, shard in enumerate(self.manifest.shards):
            path = self._local_file(index)
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
            if digest.hexdigest() != shard.sha256:
                raise CorpusError(f"{redact(self.location)}/{shard.file} does not match its sha256 in "
                                  f"{MANIFEST_NAME}; the shard is corrupt: rewrite the folder with curtail prepare-data")

    # -------------------------------------------------------------------------- mapping shards

    def _map(self, index: int) -> np.memmap:
        if index in self._mapped:
            self._mapped.move_to_end(index)
            return self._mapped[index]
        shard = self.manifest.shards[index]
        path = self._local_file(index)
        expected_bytes = shard.num_tokens * self.dtype.itemsize
        if path.stat().st_size != expected_bytes:
            raise CorpusError(f"{redact(self.location)}/{shard.file} has {path.stat().st_size} bytes but the "
                              f"manifest says {shard.num_tokens} tokens ({expected_bytes} bytes); the folder is "
                              "incomplete or corrupt: rewrite it with curtail prepare-data")
        self._mapped[index] = np.memmap(path, dtype=self.dtype, mode="r", shape=(shard.num_tokens,))
        while len(self._mapped) > self.max_mapped_shards:
            evicted, _ = self._mapped.popitem(last=False)
            self._release(evicted)
        return self._mapped[index]

    def _local_file(self, index: int) -> Path:
        shard = self.manifest.shards[index]
        if not is_uri(self.location):
            path = Path(self.location) / shard.file
            if not path.is_file():
                raise CorpusError(f"{path} is missing; the shard folder is incomplete: rewrite it with "
                                  "curtail prepare-data")
            return path
        if index not in self._fetched:
            self._fetched[index] = self._fetch(shard)
        return self._fetched[index]

    def _fetch(self, shard: ShardEntry) -> Path:
        """Copy one shard from object storage into this process's cache, checking its sha256."""
        folder = (self.cache_dir or DEFAULT_CACHE) / self.manifest.identity / str(os.getpid())
        folder.mkdir(parents=True, exist_ok=True)
        filesystem, path = open_location(join(self.location, shard.file))
        digest = hashlib.sha256()
        handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{shard.file}.")
        try:
            with os.fdopen(handle, "wb") as out, filesystem.open_input_stream(path) as source:
                while chunk := source.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, FileNotFoundError) as error:
            Path(staging).unlink(missing_ok=True)
            raise CorpusError(f"{redact(join(self.location, shard.file))} could not be read ({error}); the shard "
                              "folder is incomplete or the storage unreachable") from None
        if digest.hexdigest() != shard.sha256:
            Path(staging).unlink(missing_ok=True)
            raise CorpusError(f"{redact(join(self.location, shard.file))} does not match its sha256 in "
                              f"{MANIFEST_NAME}; rewrite the folder with curtail prepare-data")
        target = folder / shard.file
        os.replace(staging, target)
        return target

    def _release(self, index: int) -> None:
        """Forget a shard's mapping; a fetched copy leaves the local cache with it."""
        path = self._fetched.pop(index, None)
        if path is not None:
            path.unlink(missing_ok=True)
            if path.parent.is_dir() and not any(path.parent.iterdir()):
                shutil.rmtree(path.parent, ignore_errors=True)
