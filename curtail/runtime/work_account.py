"""The work account: which token ranges each site holds, has trained, and has delivered.

A site claims ranges from the data ledger before it trains them; what it trained stays
*pending* until its work enters the global model (a submission averaged, a single-site
publish), when the ledger records the ranges as trained. An overlapped sync's submission is
*in flight* (:meth:`WorkAccount.send`) until its outer step has run: only then is it delivered,
while the site's next round accrues beside it. A site that dies loses its pending and in-flight
work: the ranges go back to the pool and the ledger records them as re-trained. Every trained,
delivered and released range is also appended to the fsync'd ledger journal, so a resume from
a checkpoint knows exactly which work the crash discarded (:meth:`WorkAccount.resume`);
``on_journal`` hears of every entry (a run on object storage uploads the journal then).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curtail.runtime.checkpoint import LedgerJournal, lost_since, read_journal
from curtail.training.ledger import DataLedger, TokenRange


class WorkAccount:
    def __init__(self, ledger: DataLedger, tokens_per_step: int, sites: list[str], journal_dir: Path | None,
                 on_journal: Callable[[], None] | None = None):
        self.ledger = ledger
        self.tokens_per_step = tokens_per_step
        self.pending: dict[str, list[tuple[TokenRange, int]]] = {site: [] for site in sites}  # (range, trained)
        self.round_tokens = dict.fromkeys(sites, 0.0)  # trained since the site's last delivery
        # submitted in an overlapped sync whose outer step has not run yet: (pending, tokens)
        self.in_flight: dict[str, tuple[list[tuple[TokenRange, int]], float]] = {}
        self.journal = LedgerJournal(journal_dir) if journal_dir is not None else None
        self.on_journal = on_journal  # after every entry (a run on object storage uploads the journal)

    @property
    def settled(self) -> bool:
        """No site holds undelivered work or claims: a checkpoint here loses nothing."""
        return not any(self.round_tokens.values()) and not self.in_flight and not self.ledger.outstanding_tokens

    @property
    def settled_but_in_flight(self) -> bool:
        """No undelivered work but the round in flight, and no claim but its ranges: a checkpoint
        of this instant, written once that round landed, loses nothing."""
        in_flight_tokens = sum(r.num_tokens for pending, _ in self.in_flight.values() for r, _ in pending)
        return not any(self.round_tokens.values()) and self.ledger.outstanding_tokens == in_flight_tokens

    def _journal(self, kind: str, site: str, ranges: list[list[int]], t_s: float, **details: Any) -> None:
        if self.journal is not None and ranges:
            self.journal.append(kind, site, ranges, t_s=t_s, wall=time.time(), **details)
            if self.on_journal is not None:
                self.on_journal()

    def claim(self, site: str, num_steps: int) -> list[TokenRange]:
        """Claim ``num_steps`` steps' worth of tokens for ``site`` (one range, or more at an epoch end)."""
        ranges = []
        remaining = num_steps * self.tokens_per_step
        while remaining > 0:
            token_range = self.ledger.claim(site, remaining)
            ranges.append(token_range)
            remaining -= token_range.num_tokens
        return ranges

    def trained(self, site: str, ranges: list[TokenRange], trained_tokens: int, t_s: float) -> None:
        """``site`` trained ``trained_tokens`` of its claimed ``ranges``, in order; the rest goes
        back when it delivers."""
        self.round_tokens[site] += trained_tokens
        journaled = []
        for token_range in ranges:
            trained = min(token_range.num_tokens, trained_tokens)
            self.pending[site].append((token_range, trained))
            trained_tokens -= trained
            if trained:
                journaled.append([token_range.epoch, token_range.start, token_range.start + trained])
        self._journal("trained", site, journaled, t_s)

    def undelivered(self, site: str) -> float:
        return self.round_tokens[site]

    def delivered(self, site: str, t_s: float) -> None:
        """``site``'s work has entered the global model: record its ranges as trained."""
        for token_range, trained in self.pending[site]:
            self.ledger.complete(site, token_range, trained)
        self._journal("delivered", site, [[r.epoch, r.start, r.start + n] for r, n in self.pending[site] if n], t_s)
        self.pending[site] = []
        self.round_tokens[site] = 0.0

    def send(self, site: str) -> None:
        """``site`` submitted its round in an overlapped sync: in flight until :meth:`arrived`."""
        if site in self.in_flight:
            raise RuntimeError(f"site {site!r} sent a round while its previous one is still in flight")
        self.in_flight[site] = (self.pending[site], self.round_tokens[site])
        self.pending[site], self.round_tokens[site] = [], 0.0

    def arrived(self, site: str, t_s: float) -> None:
        """``site``'s in-flight round entered the global model: record its ranges as trained."""
        pending, _ = self.in_flight.pop(site)
        for token_range, trained in pending:
            self.ledger.complete(site, token_range, trained)
        self._journal("delivered", site, [[r.epoch, r.start, r.start + n] for r, n in pending if n], t_s)

    def lose_round(self, site: str) -> float:
        """``site`` failed: its undelivered tokens (in flight too) no longer count (returns them)."""
        lost, self.round_tokens[site] = self.round_tokens[site], 0.0
        if site in self.in_flight:
            pending, tokens = self.in_flight.pop(site)
            self.pending[site] = pending + self.pending[site]  # released with the rest
            lost += tokens
        return lost

    def release(self, site: str, t_s: float) -> dict[str, Any]:
        """A failed site is out: what it trained and never delivered is recorded as re-trained,
        its claims go back to the pool. Returns the ``ledger_release`` event's details."""
        if site in self.in_flight:
            self.lose_round(site)
        lost = [(r.epoch, r.start, r.start + n) for r, n in self.pending[site] if n]
        self.ledger.record_retrained(f"site_failure:{site}", lost)
        released = [r.to_list() for r in self.ledger.release(site)]
        self._journal("released", site, released, t_s)
        self.pending[site] = []
        self.round_tokens[site] = 0.0
        return {"ranges": released, "tokens": sum(end - start for _, start, end in released),
                "retrained_tokens": sum(end - start for _, start, end in lost)}

    def resume(self, journal_mark: int, checkpoint: str, checkpoint_t_s: float, saved_wall: float | None) -> dict[str, Any]:
        """Resume from a checkpoint that saw the journal up to ``journal_mark``: the work journaled
        after it was lost with the crash; record it as re-trained (its ranges are back in the pool,
        lowest first, so they are the next to train). Returns the ``retrained`` event's details."""
        lost = lost_since(read_journal(self.journal.path), journal_mark) if self.journal is not None else None
        if lost is None:
            return {}
        for site, epoch, start, end in lost["site_failures"]:  # recorded after the checkpoint: again
            self.ledger.record_retrained(f"site_failure:{site}", [(epoch, start, end)])
        self.ledger.record_retrained(f"resume:{checkpoint}", [tuple(r) for r in lost["ranges"]])
        note = {
            "checkpoint": checkpoint, "ranges": lost["ranges"], "tokens": lost["tokens"],
            "delivered_tokens": lost["delivered_tokens"], "checkpoint_t_s": checkpoint_t_s,
            "virtual_s_lost": max(0.0, (lost["last_t_s"] or checkpoint_t_s) - checkpoint_t_s),
            "wall_s_lost": None if saved_wall is None else time.time() - float(saved_wall),
        }
        self.journal.append("resume", "", [], t_s=checkpoint_t_s, wall=time.time(),
                            **{k: v for k, v in note.items() if k != "ranges"}, lost_ranges=lost["ranges"])
        if self.on_journal is not None:
            self.on_journal()
        return note

    @property
    def journal_seq(self) -> int:
        return self.journal.seq if self.journal is not None else 0

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
