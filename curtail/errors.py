"""Errors a user can cause and fix: each says what is wrong and what to do, in one message.

The CLI prints any :class:`CurtailError` (like :class:`~curtail.config.ConfigError` and
:class:`~curtail.planning.traces.TraceError`, which are raised where configs and traces are
loaded) as one ``curtail: error: ...`` line and exits non-zero; anything else is a bug and
keeps its traceback.

* :class:`PreflightError` — checked before Ray starts or right after it connects: a file the
  run needs is missing or unreadable, the output location is not writable, the cluster does
  not offer the resources the config asks for (the message names the config key).
* :class:`CheckpointError` — a checkpoint folder is incomplete or corrupt (names the file).
* :class:`ResumeError` — a resume is refused: a completed run, a config that differs from the
  run's, no intact checkpoint while the run's journal records trained work.
* :class:`StorageError` — a run directory on a URI cannot be opened, read or written (names the
  location, without credentials).
* :class:`CorpusError` — a token shard folder is missing, incomplete or corrupt, or its inputs
  cannot be read (names the file).
"""

from __future__ import annotations


class CurtailError(Exception):
    """Base of the errors a user can cause; the message says what to fix."""


class PreflightError(CurtailError):
    """The run cannot start: a file, the output location or the cluster is not as the config needs."""


class CheckpointError(CurtailError):
    """A checkpoint folder is incomplete or corrupt."""


class ResumeError(CurtailError):
    """A run directory cannot be resumed as asked; nothing in it was changed."""


class StorageError(CurtailError):
    """A run directory's storage location cannot be opened, read or written."""


class CorpusError(CurtailError):
    """A corpus or token shard folder cannot be written or read as the run needs."""
