"""Data preparation: local text, JSONL and Parquet files tokenized into a token shard folder.

:func:`prepare_shards` is what ``curtail prepare-data`` runs:

1. **The tokenizer**: the one given (``tokenizer=FOLDER``), or a byte-level BPE
   (:func:`~curtail.training.tokenizer.train_tokenizer`) trained on the corpus' first
   ``tokenizer_sample_bytes`` of text. When the corpus is plain text files no larger than that,
   it is trained on the files themselves: the same tokenizer a run with ``corpus = [...]`` trains.
2. **Encoding**: every source file is streamed with ``datasets`` (the packaged ``text``,
   ``json`` and ``parquet`` builders with ``streaming=True``: a batch of rows at a time, never
   the whole file), encoded a batch at a time and appended to that file's own shards. Files are
   spread over ``num_proc`` processes; since each writes only its files' shards, the folder does
   not depend on ``num_proc``. Text files are encoded line by line with the line breaks kept and
   nothing between lines (as :func:`~curtail.training.data.tokenize_files` does); each JSON or
   Parquet document (its ``text_field``) ends with the end-of-text token.
3. **The manifest** (:class:`~curtail.training.shards.ShardManifest`) lists the shards in source
   order, held-out files last, with token counts and sha256, and where the held-out part starts
   (the first held-out file, or the last ``heldout_fraction`` of the tokens). It is written last:
   a folder without one is not a shard folder.

Memory is one batch of rows per process (``batch_rows``) plus the tokenizer, whatever the
corpus size (``experiments/bench_prepare_data.py`` measures the peak). An output on object
storage (a :mod:`pyarrow.fs` URI) is written locally first and uploaded, manifest last.

Example::

    manifest = prepare_shards(["data/text/wikitext-2_valid.txt"], "data/shards/wikitext", vocab_size=2048)
    manifest.num_tokens, len(manifest.shards)
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow

from curtail.errors import CorpusError
from curtail.run_store import is_uri, join, open_location, redact
from curtail.training.shards import (
    MANIFEST_NAME,
    TOKENIZER_DIR,
    ShardEntry,
    ShardManifest,
    SourceEntry,
)

#: Tokens per full shard: 16 Mi tokens (32 MiB as uint16).
DEFAULT_SHARD_TOKENS = 1 << 24
#: Text the tokenizer is trained on when none is given.
DEFAULT_TOKENIZER_SAMPLE_BYTES = 64 << 20

SourceFormat = Literal["text", "json", "parquet"]
_SUFFIXES: dict[str, SourceFormat] = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
}


def source_format(path: Path) -> SourceFormat:
    """The ``datasets`` builder for a file, by its suffix (``.gz``/``.zst`` etc. looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst", ".zstd"):
        suffixes.pop()
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    raise CorpusError(f"{path}: unknown corpus file type; use .txt/.md (text, one row per line), "
                      ".jsonl/.json (one document per object) or .parquet, optionally compressed")


def expand_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, and the corpus files inside folders named (sorted), in order."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            inside = sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith("."))
            found = [p for p in inside if _known(p)]
            if not found:
                raise CorpusError(f"{entry} holds no .txt, .jsonl or .parquet files; pass corpus files")
            files.extend(found)
        elif entry.is_file():
            source_format(entry)
            files.append(entry)
        else:
            raise CorpusError(f"corpus file {entry} does not exist; pass local text, JSONL or Parquet files")
    if not files:
        raise CorpusError("no corpus files given; pass at least one text, JSONL or Parquet file")
    return files


@dataclass(frozen=True)
class _SourceTask:
    """One source file for one encoding process (crosses the process edge)."""

    index: int
    path: str
    format: SourceFormat
    text_field: str
    tokenizer_file: str
    folder: str
    dtype: str
    shard_tokens: int
    eos_id: int | None  # appended after each document (json/parquet)
    batch_rows: int


def prepare_shards(
    sources: Sequence[str | Path],
    output: str | Path,
    *,
    vocab_size: int = 2048,
    tokenizer: str | Path | None = None,
    heldout: Sequence[str | Path] | None = None,
    heldout_fraction: float = 0.05,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    num_proc: int = 1,
    batch_rows: int = 1024,
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
    cache_dir: str | Path = ".cache",
    overwrite: bool = False,
) -> ShardManifest:
    """Tokenize ``sources`` into a shard folder at ``output`` (a path or a URI); its manifest.

    ``heldout`` names separate held-out files; without them the last ``heldout_fraction`` of
    the tokens is held out. An existing shard folder at ``output`` is replaced only with
    ``overwrite``.
    """
    from curtail.training.tokenizer import END_OF_TEXT, load_tokenizer

    if shard_tokens < 1 or num_proc < 1 or batch_rows < 1:
        raise ValueError(f"shard_tokens ({shard_tokens}), num_proc ({num_proc}) and batch_rows ({batch_rows}) "
                         "must be positive")
    if heldout is None and not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}; or pass heldout files")
    train_files = expand_sources(sources)
    heldout_files = expand_sources(heldout) if heldout else []
    _refuse_existing(output, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".shards-", dir=_staging_parent(output)))
    try:
        if tokenizer is not None:
            load_tokenizer(tokenizer).save_pretrained(staging / TOKENIZER_DIR)
        else:  # in a process of its own: the trainer's memory goes back when it ends
            with _processes(1) as pool:
                pool.submit(_train_tokenizer, train_files, vocab_size, text_field, tokenizer_sample_bytes,
                            Path(cache_dir), staging / TOKENIZER_DIR).result()
        bpe = load_tokenizer(staging / TOKENIZER_DIR)
        from curtail.training.data import (  # (not at import: encoders stay light)
            token_dtype,
            tokenizer_sha256,
        )

        dtype = np.dtype(token_dtype(len(bpe))).name
        eos_id = bpe.convert_tokens_to_ids(END_OF_TEXT)
        files = train_files + heldout_files
        tasks = [
            _SourceTask(index, str(path), source_format(path), text_field, str(staging / TOKENIZER_DIR / "tokenizer.json"),
                        str(staging), dtype, shard_tokens, None if source_format(path) == "text" else eos_id,
                        batch_rows)
            for index, path in enumerate(files)
        ]
        shards = [shard for per_file in _encode_all(tasks, num_proc) for shard in per_file]
        if not shards:
            raise CorpusError(f"corpus {', '.join(map(str, train_files))} holds no text; pass files with text")
        train_tokens = sum(s.num_tokens for s in shards if s.source < len(train_files))
        total = sum(s.num_tokens for s in shards)
        heldout_start = train_tokens if heldout_files else total - round(total * heldout_fraction)
        if heldout_start < 2 or total - heldout_start < 2:
            raise CorpusError(f"corpus of {total} tokens is too small to hold out "
                              f"{'the held-out files' if heldout_files else f'{heldout_fraction:.0%}'}; use more text")
        manifest = ShardManifest(
            dtype=dtype, vocab_size=len(bpe), tokenizer_sha256=tokenizer_sha256(bpe), shard_tokens=shard_tokens,
            eos_between_documents=any(task.eos_id is not None for task in tasks),
            sources=[SourceEntry(path=str(path), format=source_format(path), num_bytes=path.stat().st_size,
                                 heldout=index >= len(train_files)) for index, path in enumerate(files)],
            shards=shards, heldout_start=heldout_start,
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        _publish(staging, output)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------- the tokenizer


def _train_tokenizer(files: list[Path], vocab_size: int, text_field: str, sample_bytes: int, cache_dir: Path,
                     folder: Path) -> None:
    """Train the tokenizer (or take it from ``cache_dir``) and save it into ``folder``."""
    _train_or_load(files, vocab_size, text_field, sample_bytes, cache_dir).save_pretrained(folder)


def _train_or_load(files: list[Path], vocab_size: int, text_field: str, sample_bytes: int, cache_dir: Path):
    from curtail.training.tokenizer import train_tokenizer

    if all(source_format(p) == "text" for p in files) and sum(p.stat().st_size for p in files) <= sample_bytes:
        return train_tokenizer(files, vocab_size, cache_dir)  # the corpus itself, as a corpus= run trains
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, prefix=".tokenizer-sample-", suffix=".txt",
                                     encoding="utf-8", delete=False) as sample:
        written = 0
        for path in files:
            for texts in _read_rows(str(path), source_format(path), text_field, 256):
                for text in texts:
                    sample.write(text if source_format(path) == "text" else text + "\n")
                    written += len(text.encode())
                if written >= sample_bytes:
                    break
            if written >= sample_bytes:
                break
    try:
        return train_tokenizer(sample.name, vocab_size, cache_dir)
    finally:
        os.unlink(sample.name)


# ------------------------------------------------------------------------------- encoding


def _encode_all(tasks: list[_SourceTask], num_proc: int) -> list[list[ShardEntry]]:
    """Each source's shards, in source order; files spread over ``num_proc`` processes."""
    if num_proc == 1 or len(tasks) == 1:
        return [_encode_source(task) for task in tasks]
    with _processes(min(num_proc, len(tasks))) as pool:
        return list(pool.map(_encode_source, tasks))


def _processes(count: int) -> concurrent.futures.ProcessPoolExecutor:
    """``count`` fresh (spawned) processes sharing the cores."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=count, mp_context=multiprocessing.get_context("spawn"),
        initializer=_limit_threads, initargs=(max(1, (os.cpu_count() or 1) // count),),
    )


def _limit_threads(threads: int) -> None:
    """An encoding process uses its share of the cores (the tokenizer's Rayon pool reads this)."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)


def _encode_source(task: _SourceTask) -> list[ShardEntry]:
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(task.tokenizer_file)
    writer = _ShardWriter(Path(task.folder), task.index, np.dtype(task.dtype), task.shard_tokens)
    try:
        for texts in _read_rows(task.path, task.format, task.text_field, task.batch_rows):
            encoded = bpe.encode_batch_fast(texts, add_special_tokens=False) if texts else []
            ids = [e.ids + [task.eos_id] if task.eos_id is not None else e.ids for e in encoded]
            if ids:
                writer.append(np.fromiter((t for row in ids for t in row), dtype=task.dtype))
    finally:
        entries = writer.close()
    return entries


def _read_rows(path: str, fmt: SourceFormat, text_field: str, batch_rows: int) -> Iterator[list[str]]:
    """A file's texts, ``batch_rows`` rows at a time, streamed with ``datasets``."""
    import datasets

    datasets.disable_progress_bars()
    # read 1 MiB at a time (the builders' default of 10 MiB costs ~100 MB more per process, measured);
    # parquet: only the text column, batch_rows rows at a time (an empty file's row groups hold 0)
    options: dict = {"text": {"keep_linebreaks": True, "chunksize": 1 << 20}, "json": {"chunksize": 1 << 20},
                     "parquet": {"batch_size": batch_rows, "columns": [text_field]}}[fmt]
    try:
        stream = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True, **options)
        field = "text" if fmt == "text" else text_field
        for batch in stream.iter(batch_size=batch_rows):
            if field not in batch:
                raise CorpusError(f"{path} has no field {field!r} (it has {', '.join(batch)}); pick the text "
                                  "column with --text-field")
            yield [text for text in batch[field] if text]
    except CorpusError:
        raise
    except (OSError, ValueError, pyarrow.ArrowException) as error:  # parse errors name the file badly or not at all
        raise CorpusError(f"{path} could not be read as {fmt} ({type(error).__name__}: {error}); "
                          "check the file or its suffix") from None


class _ShardWriter:
    """Appends one source's tokens to its shards, ``shard_tokens`` per file, hashing as it writes."""

    def __init__(self, folder: Path, source: int, dtype: np.dtype, shard_tokens: int):
        self.folder, self.source, self.dtype, self.shard_tokens = folder, source, dtype, shard_tokens
        self.entries: list[ShardEntry] = []
        self._handle = None
        self._digest = hashlib.sha256()
        self._count = 0

    def append(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._handle is None:
                self._handle = open(self.folder / self._name(), "wb")  # noqa: SIM115 -- spans appends; _finish closes
            take = min(tokens.size, self.shard_tokens - self._count)
            data = tokens[:take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._handle.write(data)
            self._digest.update(data)
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[ShardEntry]:
        if self._handle is not None:
            self._finish()
        return self.entries

    def _name(self) -> str:
        return f"{self.source:05d}-{len(self.entries):05d}.bin"

    def _finish(self) -> None:
        self._handle.close()
        if self._count:
            self.entries.append(ShardEntry(file=self._name(), num_tokens=self._count,
                                           sha256=self._digest.hexdigest(), source=self.source))
        self._handle, self._digest, self._count = None, hashlib.sha256(), 0


# ------------------------------------------------------------------------------- the output


def _staging_parent(output: str | Path) -> Path:
    """Local outputs are staged beside their folder (one rename); URIs in the temp folder."""
    if is_uri(output):
        return Path(tempfile.gettempdir())
    parent = Path(output).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _refuse_existing(output: str | Path, overwrite: bool) -> None:
    """Replace only a shard folder, and only when asked: never another folder's files."""
    import pyarrow.fs as pafs

    filesystem, path = open_location(output)
    holds_shards = filesystem.get_file_info(join(path, MANIFEST_NAME)).type == pafs.FileType.File
    if holds_shards and not overwrite:
        raise CorpusError(f"{redact(str(output))} already holds a shard folder; pass --overwrite to replace it "
                          "or choose another --output")
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.File:
        raise CorpusError(f"{redact(str(output))} is a file; --output must name a folder")
    if kind == pafs.FileType.Directory and not holds_shards and filesystem.get_file_info(pafs.FileSelector(path)):
        raise CorpusError(f"{redact(str(output))} is a folder with other files in it; --output must name a new or "
                          "empty folder (or a shard folder, with --overwrite)")


def _publish(staging: Path, output: str | Path) -> None:
    """Move the staged folder into place; the manifest arrives last."""
    if not is_uri(output):
        target = Path(output)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return
    import pyarrow.fs as pafs

    filesystem, path = open_location(output)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir_contents(path)
    filesystem.create_dir(path, recursive=True)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for local in [*files, staging / MANIFEST_NAME]:
        relative = local.relative_to(staging).as_posix()
        pafs.copy_files(str(local), f"{path}/{relative}", destination_filesystem=filesystem)


def _known(path: Path) -> bool:
    try:
        source_format(path)
    except CorpusError:
        return False
    return True
