"""The run checkpointer: when a whole-run checkpoint is due, what goes in it, and the writer.

A checkpoint is taken at a safe point (no site holds undelivered work) after the global
weights changed (a sync or a single-site hand-off). Everything it needs is gathered there —
the averaging actors' parts (each actor writes its own weights and momentum files, asked now:
an actor serves the request before any later change), the sites' inner optimizers (saved by the sites
into a staging folder), the ledger, the state machine and the coordinator's bookkeeping — and
the files are written by one background thread, so the sites go on training meanwhile. For a
run directory on object storage (:class:`~curtail.run_store.RunStore`) the sites save their inner
optimizers to the URI, the checkpointer brings them into the working copy, and the writer uploads
the finished checkpoint.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curtail.run_store import RunStore
from curtail.runtime.checkpoint import averager_staging_dir, inner_staging_dir, write_checkpoint


class RunCheckpointer:
    def __init__(self, store: RunStore, *, inner_optimizer: bool):
        self.store = store
        self.run_dir = store.local
        self.inner_optimizer = inner_optimizer  # also save every running site's inner AdamW
        self.sequence = 0
        self.checkpointed_version = 0  # the global version of the newest checkpoint
        self.last_written: str | None = None  # folder name of the newest checkpoint
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._write: concurrent.futures.Future | None = None

    def due(self, global_version: int) -> bool:
        """A checkpoint is due once the global weights moved past the last one."""
        return global_version != self.checkpointed_version

    def save(
        self,
        global_version: int,
        *,
        save_averager: Callable[[str], Callable[[], dict[str, Any]]],
        save_inner: Callable[[str], bool],
        state: Callable[[], dict[str, Any]],
        complete_executor: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Take checkpoint ``sequence + 1``. ``save_averager(location)`` asks the averaging actors
        to write their parts there, a folder or a URI, and returns a function that waits for them
        (``AveragerClient.save_later``: the sites train on while gigabytes of weights and momentum
        are written, and no process gathers them); ``save_inner(location)`` asks the running sites
        to save their inner optimizers there (True if any did); ``state()`` returns the JSON parts
        (``ledger``, ``executor``, ``coordinator``), gathered after the sites' saves; the writer
        calls ``complete_executor(executor_state)`` (what is still being computed, e.g. held-out scores)."""
        self.wait()  # at most one write in flight
        self.sequence += 1
        sequence = self.sequence
        averager_dir = averager_staging_dir(self.run_dir, sequence)
        averager_saved = save_averager(self.store.location(averager_dir))
        inner_dir = None
        if self.inner_optimizer:
            folder = inner_staging_dir(self.run_dir, sequence)
            inner_dir = folder if save_inner(self.store.location(folder)) else None
        parts = state()
        self._write = self._writer.submit(
            self._write_and_upload, sequence, averager_saved=averager_saved, averager_dir=averager_dir,
            ledger_state=parts["ledger"], executor_state=parts["executor"],
            coordinator_state=parts["coordinator"], inner_dir=inner_dir, complete_executor=complete_executor,
        )
        self.checkpointed_version = global_version
        self.last_written = f"{sequence:06d}"

    def _write_and_upload(self, sequence: int, *, inner_dir: Path | None, averager_dir: Path,
                          averager_saved: Callable[[], dict[str, Any]],
                          complete_executor: Callable[[dict[str, Any]], None] | None,
                          **parts: dict[str, Any]) -> None:
        parts["averager_state"] = averager_saved()
        if complete_executor is not None:
            complete_executor(parts["executor_state"])
        if self.store.remote is not None:  # the actors and the sites wrote to the URI
            for folder in (averager_dir, inner_dir):
                if folder is not None:
                    staged = folder.relative_to(self.run_dir).as_posix()
                    self.store.fetch(staged)
                    self.store.remove(staged)
        final = write_checkpoint(self.run_dir, sequence, inner_dir=inner_dir, averager_dir=averager_dir, **parts)
        self.store.push_checkpoint(final)

    def wait(self) -> None:
        """Block until the checkpoint being written is on disk (errors surface here)."""
        if self._write is not None:
            self._write.result()
            self._write = None

    def restore(self, sequence: int, global_version: int) -> None:
        self.sequence = sequence
        self.checkpointed_version = global_version
