"""Data ledger: disjoint claims, exact accounting of trained tokens, epochs, checkpoints."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from curtail.training.ledger import (
    DataLedger,
    LedgerError,
    LedgerExhaustedError,
    TokenRange,
    TrainedSegment,
)


def test_claims_are_consecutive_and_disjoint() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    assert ledger.claim("a", 30) == TokenRange(0, 0, 30)
    assert ledger.claim("b", 25) == TokenRange(0, 30, 50)  # rounded down to whole blocks
    assert ledger.outstanding == {"a": [TokenRange(0, 0, 30)], "b": [TokenRange(0, 30, 50)]}
    assert ledger.outstanding_tokens == 50 and ledger.pool_tokens == 50
    ledger.check_invariants()


def test_partial_completion_returns_the_rest_first() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    first = ledger.claim("a", 40)
    ledger.claim("b", 20)
    ledger.complete("a", first, trained_tokens=10)  # a graceful leave after one batch
    assert ledger.trained_tokens == 10
    assert ledger.trained_by_site == {"a": 10}
    # The returned [10, 40) is handed out before the untouched [60, 100).
    assert ledger.claim("c", 100) == TokenRange(0, 10, 40)
    assert ledger.claim("c", 100) == TokenRange(0, 60, 100)
    ledger.check_invariants()


def test_release_returns_a_dead_sites_claims() -> None:
    ledger = DataLedger(total_tokens=60, block_tokens=10)
    ledger.claim("a", 20)
    ledger.claim("a", 20)
    ledger.claim("b", 20)
    assert ledger.release("a") == [TokenRange(0, 0, 20), TokenRange(0, 20, 40)]
    assert ledger.outstanding == {"b": [TokenRange(0, 40, 60)]}
    assert ledger.epochs[0].pool == [[0, 40]]  # merged back into one free range
    assert ledger.release("nobody") == []
    ledger.check_invariants()


def test_epoch_wraps_and_is_recorded() -> None:
    ledger = DataLedger(total_tokens=35, block_tokens=10)
    assert ledger.unused_tail_tokens == 5 and ledger.usable_tokens == 30
    whole = ledger.claim("a", 100)
    assert whole == TokenRange(0, 0, 30)
    # The pool is empty while "a" still trains: "b" starts the next pass instead of waiting.
    second = ledger.claim("b", 10)
    assert second == TokenRange(1, 0, 10)
    assert ledger.epoch == 1
    ledger.complete("a", whole, trained_tokens=20)
    # A straggler's returned piece of epoch 0 is trained before more of epoch 1.
    assert ledger.claim("b", 100) == TokenRange(0, 20, 30)
    assert ledger.claim("b", 100) == TokenRange(1, 10, 30)
    assert ledger.num_epochs_completed == 0
    for site, claims in ledger.outstanding.items():
        for token_range in claims:
            ledger.complete(site, token_range, token_range.num_tokens)
    assert ledger.num_epochs_completed == 2
    assert ledger.trained_tokens == 60
    assert ledger.trained_by_site == {"a": 20, "b": 40}
    assert [record.opened_at_trained_tokens for record in ledger.epochs] == [0, 0]
    assert ledger.segments("a") == [TrainedSegment("a", 0, 0, 20)]
    ledger.check_invariants()


def test_max_epochs() -> None:
    ledger = DataLedger(total_tokens=10, max_epochs=1)
    token_range = ledger.claim("a", 10)
    with pytest.raises(LedgerExhaustedError, match="raise max_epochs"):
        ledger.claim("b", 10)
    ledger.complete("a", token_range, 4)
    assert ledger.claim("b", 10) == TokenRange(0, 4, 10)


def test_adjacent_completions_merge_into_one_record() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    for _ in range(3):
        ledger.complete("a", ledger.claim("a", 10), 10)
    assert ledger.segments() == [TrainedSegment("a", 0, 0, 30)]


def test_errors_say_what_to_fix() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    token_range = ledger.claim("a", 30)
    with pytest.raises(LedgerError, match="at least one block"):
        ledger.claim("a", 9)
    with pytest.raises(LedgerError, match="holds no claim"):
        ledger.complete("b", token_range, 10)
    with pytest.raises(LedgerError, match="report 0..30"):
        ledger.complete("a", token_range, 40)
    with pytest.raises(LedgerError, match="not a multiple of block_tokens=10"):
        ledger.complete("a", token_range, 15)
    ledger.complete("a", token_range, 30)
    with pytest.raises(LedgerError, match="holds no claim"):
        ledger.complete("a", token_range, 30)  # completed twice
    with pytest.raises(LedgerError, match="smaller than one block"):
        DataLedger(total_tokens=5, block_tokens=10)


def test_checkpoint_round_trip_through_json() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    first = ledger.claim("a", 50)
    ledger.claim("b", 30)
    ledger.complete("a", first, 20)
    state = json.loads(json.dumps(ledger.to_dict()))
    restored = DataLedger.from_dict(state)
    assert restored.to_dict() == ledger.to_dict()
    assert restored.trained_by_site == {"a": 20}
    # On resume, work in flight at the checkpoint was lost with the sites: hand it back.
    assert restored.release_all() == [TokenRange(0, 50, 80)]
    assert restored.pool_tokens == 80
    restored.check_invariants()


def test_format_1_checkpoints_still_load() -> None:
    """Format 1 wrote outstanding claims ``[start, end, epoch]``; format 2 ``[epoch, start, end]``."""
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    ledger.claim("a", 100)
    ledger.complete("a", ledger.claim("a", 30), 30)  # opens epoch 1
    ledger.claim("b", 20)
    state = json.loads(json.dumps(ledger.to_dict()))
    assert state["format"] == 2 and state["outstanding"] == {"a": [[0, 0, 100]], "b": [[1, 30, 50]]}
    old = {**state, "format": 1, "outstanding": {"a": [[0, 100, 0]], "b": [[30, 50, 1]]}}
    assert DataLedger.from_dict(old).to_dict() == state


def test_from_dict_rejects_inconsistent_checkpoints() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    ledger.complete("a", ledger.claim("a", 50), 50)
    state = ledger.to_dict()
    state["epochs"][0]["pool"] = [[40, 100]]  # [40, 50) both trained and free
    with pytest.raises(LedgerError, match="counted twice"):
        DataLedger.from_dict(state)
    state["epochs"][0]["pool"] = [[60, 100]]
    with pytest.raises(LedgerError, match=r"\[50, 60\) are lost"):
        DataLedger.from_dict(state)
    with pytest.raises(LedgerError, match="format"):
        DataLedger.from_dict({"format": 99})
    with pytest.raises(LedgerError, match="malformed"):
        DataLedger.from_dict({"format": 1, "total_tokens": 10})


SITES = st.sampled_from(["caiso_north", "spp_tx", "nem_sa"])


class LedgerMachine(RuleBasedStateMachine):
    """Random claim / complete / release / checkpoint sequences against a set-based model."""

    @initialize(
        num_blocks=st.integers(1, 12),
        block_tokens=st.integers(1, 4),
        tail_tokens=st.integers(0, 3),
        max_epochs=st.sampled_from([None, 2, 3]),
    )
    def start(self, num_blocks: int, block_tokens: int, tail_tokens: int, max_epochs: int | None) -> None:
        tail_tokens %= block_tokens
        self.block_tokens = block_tokens
        self.usable = num_blocks * block_tokens
        self.ledger = DataLedger(self.usable + tail_tokens, block_tokens, max_epochs)
        self.max_epochs = max_epochs
        self.trained: list[dict[int, str]] = []  # per epoch: position -> site
        self.claims: dict[str, list[TokenRange]] = {}
        self.completed_tokens = 0

    def free_positions(self, epoch: int) -> set[int]:
        taken = set(self.trained[epoch])
        for claims in self.claims.values():
            for r in claims:
                if r.epoch == epoch:
                    taken.update(range(r.start, r.end))
        return set(range(self.usable)) - taken

    @rule(site=SITES, num_blocks=st.integers(1, 6))
    def claim(self, site: str, num_blocks: int) -> None:
        oldest = next((e for e in range(len(self.trained)) if self.free_positions(e)), None)
        if oldest is None and self.max_epochs is not None and len(self.trained) == self.max_epochs:
            with pytest.raises(LedgerExhaustedError):
                self.ledger.claim(site, num_blocks * self.block_tokens)
            return
        token_range = self.ledger.claim(site, num_blocks * self.block_tokens)
        if oldest is None:
            self.trained.append({})
            oldest = len(self.trained) - 1
        free = self.free_positions(oldest)
        assert token_range.epoch == oldest
        assert token_range.start == min(free)  # returned / lowest positions first
        assert set(range(token_range.start, token_range.end)) <= free  # never handed out twice
        assert 0 < token_range.num_tokens <= num_blocks * self.block_tokens
        assert token_range.num_tokens % self.block_tokens == 0
        self.claims.setdefault(site, []).append(token_range)

    @precondition(lambda self: any(self.claims.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        site = data.draw(st.sampled_from(sorted(s for s, c in self.claims.items() if c)))
        token_range = data.draw(st.sampled_from(self.claims[site]))
        trained_blocks = data.draw(st.integers(0, token_range.num_tokens // self.block_tokens))
        trained_tokens = trained_blocks * self.block_tokens
        self.ledger.complete(site, token_range, trained_tokens)
        self.claims[site].remove(token_range)
        for position in range(token_range.start, token_range.start + trained_tokens):
            assert position not in self.trained[token_range.epoch]  # nothing trained twice
            self.trained[token_range.epoch][position] = site
        self.completed_tokens += trained_tokens

    @rule(site=SITES)
    def release(self, site: str) -> None:
        assert self.ledger.release(site) == self.claims.pop(site, [])

    @rule()
    def checkpoint_and_resume(self) -> None:
        state = json.loads(json.dumps(self.ledger.to_dict()))
        self.ledger = DataLedger.from_dict(state)

    @invariant()
    def accounting_matches_the_model(self) -> None:
        if not hasattr(self, "ledger"):
            return
        self.ledger.check_invariants()
        assert self.ledger.trained_tokens == self.completed_tokens
        by_site: dict[str, int] = {}
        for epoch_trained in self.trained:
            for site in epoch_trained.values():
                by_site[site] = by_site.get(site, 0) + 1
        assert self.ledger.trained_by_site == by_site
        assert len(self.ledger.epochs) == len(self.trained)
        for epoch, record in enumerate(self.ledger.epochs):
            recorded = {
                position: segment.site
                for segment in record.trained
                for position in range(segment.start, segment.end)
            }
            assert recorded == self.trained[epoch]
            pool = {p for start, end in record.pool for p in range(start, end)}
            assert pool == self.free_positions(epoch)  # trained + pool + outstanding = all
        assert self.ledger.outstanding == {s: c for s, c in self.claims.items() if c}


LedgerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ledger_state_machine = LedgerMachine.TestCase


def test_retrained_ranges_are_recorded_and_survive_a_checkpoint() -> None:
    ledger = DataLedger(total_tokens=100, block_tokens=10)
    lost = ledger.claim("a", 30)
    ledger.record_retrained("site_failure:a", [(lost.epoch, lost.start, lost.start + 20)])
    ledger.release("a")
    assert ledger.retrained_tokens == 20
    restored = DataLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert [(r.cause, r.epoch, r.start, r.end) for r in restored.retrained] == [("site_failure:a", 0, 0, 20)]
    # the lost positions are the next ones handed out: they are what gets trained again
    assert restored.claim("b", 20) == TokenRange(0, 0, 20)
    # work lost from an epoch opened after the checkpoint (the data wrapped meanwhile) is recorded
    assert ledger.record_retrained("resume:000001", [(1, 0, 10)])[0].epoch == 1
    for bad in [(-1, 0, 10), (0, 90, 110), (0, 20, 20)]:
        with pytest.raises(LedgerError, match="is not inside an epoch"):
            ledger.record_retrained("resume:000001", [bad])
    state = ledger.to_dict()
    del state["retrained"]  # a checkpoint written before re-training was recorded
    assert DataLedger.from_dict(state).retrained == []
