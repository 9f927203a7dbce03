"""Data ledger: hands sites disjoint token ranges and records exactly what each site trained.

The training corpus is the token positions ``[0, total_tokens)`` (for a
:class:`~curtail.training.data.TokenCorpus`, ``total_tokens = corpus.num_trainable_tokens``).
Within one **epoch** (a pass over the corpus) every position is, at any moment, in exactly
one of three places:

- the **pool** — not yet trained in this epoch (never handed out, or handed back);
- **outstanding** — claimed by a site that is training it now;
- **trained** — recorded as trained, by one named site.

A site ``claim``\\ s a range (the lowest free positions of the oldest unfinished epoch, so
returned ranges are re-used first), trains it, and ``complete``\\ s it saying how many of the
range's leading tokens it trained; the rest goes back to the pool. ``release`` hands a dead
site's outstanding claims back. When no free positions are left, the next claim opens a new
epoch (a new pass over the same positions, recorded), even while other sites still hold
claims of the previous one: an idle site never waits for a straggler, and a straggler's
returned range is trained before the new epoch's.

Call ``complete`` when a site's work has entered the global model (at the sync, or at a
graceful leave, where the partial round still counts), not at every step: work lost with a
failed site must go back with ``release``, so that it is trained again.

Everything is in whole **blocks** of ``block_tokens`` (e.g. one batch,
``batch_size * seq_len``): claims and completions are block multiples, so the pool never
fragments into pieces too small to train. A tail of fewer than ``block_tokens`` positions at
the end of the corpus is never handed out (``unused_tail_tokens``).

Work trained but lost before it entered a kept global model — a site that died mid-round, or
everything after the last checkpoint when the coordinator died — is trained again from the
pool. ``record_retrained`` notes those positions and why (``retrained``), so a run can say
exactly which tokens it trained twice.

A range is always ``(epoch, start, end)``, in that order (:class:`TokenRange`, the
checkpoint, the journal); the free positions of an epoch are kept with
:mod:`curtail.training.intervals`.

Pure Python (no torch); ``to_dict``/``from_dict`` give a JSON-safe checkpoint.

Example::

    ledger = DataLedger(total_tokens=corpus.num_trainable_tokens, block_tokens=8 * 64)
    token_range = ledger.claim("caiso_north", num_tokens=100 * 8 * 64)
    ...  # train batches from token_range.start on
    ledger.complete("caiso_north", token_range, trained_tokens=37 * 8 * 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curtail.training.intervals import add_interval

LEDGER_FORMAT = 2
"""Version of :meth:`DataLedger.to_dict`. 2: outstanding claims are ``[epoch, start, end]``
(1, read too, wrote them ``[start, end, epoch]``)."""


class LedgerError(ValueError):
    """A ledger call that does not fit the ledger's state; the message says what to fix."""


class LedgerExhaustedError(LedgerError):
    """No free tokens are left and ``max_epochs`` forbids opening another epoch."""


@dataclass(frozen=True, order=True)
class TokenRange:
    """Token positions ``[start, end)`` of ``epoch`` (a pass over the corpus)."""

    epoch: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def to_list(self) -> list[int]:
        """``[epoch, start, end]`` (JSON)."""
        return [self.epoch, self.start, self.end]


@dataclass(frozen=True)
class TrainedSegment:
    """A site trained the positions ``[start, end)`` in ``epoch``."""

    site: str
    epoch: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RetrainedRange:
    """Positions ``[start, end)`` of ``epoch`` whose training was lost and is done again;
    ``cause`` says why (``"site_failure:<site>"``, ``"resume:<checkpoint>"``)."""

    cause: str
    epoch: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class EpochRecord:
    """One pass over the corpus: when it opened, its free positions and what was trained."""

    epoch: int
    opened_at_trained_tokens: int
    pool: list[list[int]] = field(default_factory=list)  # sorted, disjoint, merged [start, end)
    trained: list[TrainedSegment] = field(default_factory=list)  # in completion order

    @property
    def trained_tokens(self) -> int:
        return sum(segment.num_tokens for segment in self.trained)


class DataLedger:
    """Which token ranges each site holds and has trained, per epoch; see the module doc."""

    def __init__(
        self, total_tokens: int, block_tokens: int = 1, max_epochs: int | None = None
    ) -> None:
        if block_tokens <= 0:
            raise LedgerError(f"block_tokens must be positive, got {block_tokens}")
        if total_tokens < block_tokens:
            raise LedgerError(
                f"corpus of {total_tokens} tokens is smaller than one block of {block_tokens}; "
                "use a larger corpus or a smaller batch"
            )
        if max_epochs is not None and max_epochs <= 0:
            raise LedgerError(f"max_epochs must be positive or None, got {max_epochs}")
        self.total_tokens = total_tokens
        self.block_tokens = block_tokens
        self.max_epochs = max_epochs
        self._epochs: list[EpochRecord] = []
        self._outstanding: dict[str, list[TokenRange]] = {}
        self._trained_by_site: dict[str, int] = {}
        self._trained_tokens = 0
        self._retrained: list[RetrainedRange] = []

    # ---------------------------------------------------------------------------------------
    # Sizes

    @property
    def usable_tokens(self) -> int:
        """Positions handed out per epoch: ``total_tokens`` rounded down to whole blocks."""
        return self.total_tokens - self.unused_tail_tokens

    @property
    def unused_tail_tokens(self) -> int:
        """Positions at the end of the corpus, fewer than a block, that are never handed out."""
        return self.total_tokens % self.block_tokens

    @property
    def trained_tokens(self) -> int:
        """Tokens trained by all sites over all epochs."""
        return self._trained_tokens

    @property
    def trained_by_site(self) -> dict[str, int]:
        """Tokens trained per site over all epochs (a copy)."""
        return dict(self._trained_by_site)

    @property
    def outstanding(self) -> dict[str, list[TokenRange]]:
        """Claims not yet completed or released, per site (a copy)."""
        return {site: list(ranges) for site, ranges in self._outstanding.items() if ranges}

    @property
    def outstanding_tokens(self) -> int:
        return sum(r.num_tokens for ranges in self._outstanding.values() for r in ranges)

    @property
    def pool_tokens(self) -> int:
        """Free (claimable) positions in the epochs opened so far."""
        return sum(end - start for record in self._epochs for start, end in record.pool)

    @property
    def epoch(self) -> int:
        """The newest epoch opened (0 before and during the first pass)."""
        return self._epochs[-1].epoch if self._epochs else 0

    @property
    def epochs(self) -> list[EpochRecord]:
        """Every epoch opened, oldest first (the live records; do not modify)."""
        return self._epochs

    @property
    def num_epochs_completed(self) -> int:
        """Epochs with every usable position trained."""
        return sum(1 for record in self._epochs if record.trained_tokens == self.usable_tokens)

    @property
    def retrained(self) -> list[RetrainedRange]:
        """Every range whose training was lost and repeated, in the order recorded (a copy)."""
        return list(self._retrained)

    @property
    def retrained_tokens(self) -> int:
        return sum(r.num_tokens for r in self._retrained)

    def segments(self, site: str | None = None) -> list[TrainedSegment]:
        """What was trained, in completion order per epoch; only ``site``'s if given."""
        return [
            segment
            for record in self._epochs
            for segment in record.trained
            if site is None or segment.site == site
        ]

    # ---------------------------------------------------------------------------------------
    # Operations

    def claim(self, site: str, num_tokens: int) -> TokenRange:
        """Hand ``site`` up to ``num_tokens`` free positions (rounded down to whole blocks).

        The range is the lowest free positions of the oldest epoch with any; it may be
        shorter than asked (a returned piece, or the end of the corpus): claim again for
        more. Opens a new epoch when no positions are free.
        """
        _check_site(site)
        num_tokens = num_tokens - num_tokens % self.block_tokens
        if num_tokens <= 0:
            raise LedgerError(
                f"site {site!r} claimed fewer tokens than one block ({self.block_tokens}); "
                "claim at least one block"
            )
        record = next((r for r in self._epochs if r.pool), None)
        if record is None:
            if self.max_epochs is not None and len(self._epochs) >= self.max_epochs:
                raise LedgerExhaustedError(
                    f"all {self.max_epochs} epoch(s) are handed out "
                    f"({self.outstanding_tokens} tokens still outstanding); raise max_epochs "
                    "or stop training"
                )
            record = EpochRecord(
                epoch=len(self._epochs),
                opened_at_trained_tokens=self._trained_tokens,
                pool=[[0, self.usable_tokens]],
            )
            self._epochs.append(record)
        first = record.pool[0]
        token_range = TokenRange(record.epoch, first[0], min(first[1], first[0] + num_tokens))
        if token_range.end == first[1]:
            record.pool.pop(0)
        else:
            first[0] = token_range.end
        self._outstanding.setdefault(site, []).append(token_range)
        return token_range

    def complete(self, site: str, token_range: TokenRange, trained_tokens: int) -> None:
        """Record that ``site`` trained the first ``trained_tokens`` of its claim ``token_range``.

        The rest of the range returns to the pool. ``trained_tokens`` must be a whole number
        of blocks between 0 and the range's length.
        """
        claims = self._outstanding.get(site, [])
        if token_range not in claims:
            raise LedgerError(
                f"site {site!r} holds no claim {token_range}; complete only a range that "
                f"claim() returned to this site and that was not completed or released since "
                f"(its claims: {claims})"
            )
        if not 0 <= trained_tokens <= token_range.num_tokens:
            raise LedgerError(
                f"site {site!r} reported {trained_tokens} trained tokens for {token_range}, "
                f"which has {token_range.num_tokens}; report 0..{token_range.num_tokens}"
            )
        if trained_tokens % self.block_tokens:
            raise LedgerError(
                f"site {site!r} reported {trained_tokens} trained tokens, not a multiple of "
                f"block_tokens={self.block_tokens}; train and report whole batches"
            )
        claims.remove(token_range)
        record = self._epochs[token_range.epoch]
        split = token_range.start + trained_tokens
        if trained_tokens:
            self._record_trained(record, site, token_range.start, split)
        if split < token_range.end:
            add_interval(record.pool, split, token_range.end)

    def release(self, site: str) -> list[TokenRange]:
        """Return all of ``site``'s outstanding claims to the pool (a site failed); returns them."""
        claims = self._outstanding.pop(site, [])
        for token_range in claims:
            add_interval(self._epochs[token_range.epoch].pool, token_range.start, token_range.end)
        return claims

    def release_all(self) -> list[TokenRange]:
        """Return every outstanding claim to the pool (e.g. on resume from a checkpoint)."""
        return [r for site in list(self._outstanding) for r in self.release(site)]

    def record_retrained(self, cause: str, ranges: list[tuple[int, int, int]]) -> list[RetrainedRange]:
        """Note that the positions ``(epoch, start, end)`` were trained, lost, and go back to be
        trained again (the caller releases them); returns what was recorded. The epoch may be
        one this ledger has not opened yet: a run resumed from a checkpoint taken before its data
        wrapped lost work of the next epoch, which is trained when that epoch opens."""
        recorded = []
        for epoch, start, end in ranges:
            if epoch < 0 or not 0 <= start < end <= self.usable_tokens:
                raise LedgerError(
                    f"re-trained range {[epoch, start, end]} is not inside an epoch of "
                    f"[0, {self.usable_tokens}) positions"
                )
            recorded.append(RetrainedRange(cause, int(epoch), int(start), int(end)))
        self._retrained.extend(recorded)
        return recorded

    # ---------------------------------------------------------------------------------------
    # Checks and checkpoints

    def check_invariants(self) -> None:
        """Raise :class:`LedgerError` unless every epoch's trained, pool and outstanding
        positions are disjoint and together exactly ``[0, usable_tokens)``, and the counters
        agree with the records."""
        outstanding_by_epoch: dict[int, list[tuple[int, int]]] = {}
        for site, claims in self._outstanding.items():
            for r in claims:
                if not 0 <= r.epoch < len(self._epochs):
                    raise LedgerError(f"site {site!r} holds {r} of an epoch never opened")
                outstanding_by_epoch.setdefault(r.epoch, []).append((r.start, r.end))
        for index, record in enumerate(self._epochs):
            if record.epoch != index:
                raise LedgerError(f"epoch records out of order: record {index} says {record.epoch}")
            pieces = (
                [(s, e) for s, e in record.pool]
                + [(seg.start, seg.end) for seg in record.trained]
                + outstanding_by_epoch.get(index, [])
            )
            pieces.sort()
            position = 0
            for start, end in pieces:
                if start >= end:
                    raise LedgerError(f"epoch {index}: empty or reversed range [{start}, {end})")
                if start < position:
                    raise LedgerError(
                        f"epoch {index}: positions [{start}, {min(end, position)}) are counted "
                        "twice (trained twice, or both free and claimed)"
                    )
                if start > position:
                    raise LedgerError(f"epoch {index}: positions [{position}, {start}) are lost")
                if start % self.block_tokens or end % self.block_tokens:
                    raise LedgerError(f"epoch {index}: [{start}, {end}) is not block-aligned")
                position = end
            if position != self.usable_tokens:
                raise LedgerError(
                    f"epoch {index}: positions [{position}, {self.usable_tokens}) are lost"
                )
        by_site: dict[str, int] = {}
        for segment in self.segments():
            by_site[segment.site] = by_site.get(segment.site, 0) + segment.num_tokens
        if by_site != {s: n for s, n in self._trained_by_site.items() if n}:
            raise LedgerError(f"trained_by_site {self._trained_by_site} != records {by_site}")
        if sum(by_site.values()) != self._trained_tokens:
            raise LedgerError("trained_tokens disagrees with the trained records")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (ints, strings, lists), for checkpoints."""
        return {
            "format": LEDGER_FORMAT,
            "total_tokens": self.total_tokens,
            "block_tokens": self.block_tokens,
            "max_epochs": self.max_epochs,
            "epochs": [
                {
                    "epoch": record.epoch,
                    "opened_at_trained_tokens": record.opened_at_trained_tokens,
                    "pool": [list(interval) for interval in record.pool],
                    "trained": [[seg.site, seg.start, seg.end] for seg in record.trained],
                }
                for record in self._epochs
            ],
            "outstanding": {
                site: [r.to_list() for r in claims]
                for site, claims in self._outstanding.items()
                if claims
            },
            "retrained": [[r.cause, r.epoch, r.start, r.end] for r in self._retrained],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> DataLedger:
        """Rebuild a ledger from :meth:`to_dict`; raises :class:`LedgerError` if inconsistent."""
        if state.get("format") not in (1, LEDGER_FORMAT):
            raise LedgerError(
                f"ledger checkpoint has format {state.get('format')!r}, this code reads "
                f"1..{LEDGER_FORMAT}; resume with the curtail version that wrote it"
            )
        try:
            ledger = cls(
                int(state["total_tokens"]), int(state["block_tokens"]), state.get("max_epochs")
            )
            for entry in state["epochs"]:
                record = EpochRecord(
                    epoch=int(entry["epoch"]),
                    opened_at_trained_tokens=int(entry["opened_at_trained_tokens"]),
                    pool=[[int(s), int(e)] for s, e in entry["pool"]],
                )
                ledger._epochs.append(record)
                for site, start, end in entry["trained"]:
                    ledger._record_trained(record, str(site), int(start), int(end), merge=False)
            for site, claims in state["outstanding"].items():
                if state["format"] == 1:  # [start, end, epoch]
                    claims = [[epoch, start, end] for start, end, epoch in claims]
                ledger._outstanding[str(site)] = [TokenRange(*map(int, c)) for c in claims]
            ledger._retrained = [  # absent in checkpoints written before it was kept
                RetrainedRange(str(cause), int(epoch), int(start), int(end))
                for cause, epoch, start, end in state.get("retrained", [])
            ]
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, LedgerError):
                raise
            raise LedgerError(f"ledger checkpoint is malformed ({error!r}); was it edited?") from error
        ledger.check_invariants()
        return ledger

    def __repr__(self) -> str:
        return (
            f"DataLedger(total_tokens={self.total_tokens}, block_tokens={self.block_tokens}, "
            f"epoch={self.epoch}, trained_tokens={self.trained_tokens}, "
            f"outstanding_tokens={self.outstanding_tokens}, pool_tokens={self.pool_tokens})"
        )

    def _record_trained(
        self, record: EpochRecord, site: str, start: int, end: int, merge: bool = True
    ) -> None:
        last = record.trained[-1] if record.trained else None
        if merge and last is not None and last.site == site and last.end == start:
            record.trained[-1] = TrainedSegment(site, record.epoch, last.start, end)
        else:
            record.trained.append(TrainedSegment(site, record.epoch, start, end))
        self._trained_by_site[site] = self._trained_by_site.get(site, 0) + end - start
        self._trained_tokens += end - start


def _check_site(site: str) -> None:
    if not isinstance(site, str) or not site:
        raise LedgerError(f"site must be a non-empty string, got {site!r}")
