"""Global LR schedule: golden values, clamping, validation."""

from __future__ import annotations

import itertools

import pytest

from curtail.training.schedule import LRSchedule, lr_at

SCHEDULE = LRSchedule(
    peak_lr=1e-3, total_tokens=10_000, warmup_tokens=1_000, warmdown_tokens=4_000,
    final_lr_fraction=0.1,
)

# (tokens trained, learning rate), worked by hand: warmup 0 → 1e-3 over [0, 1000],
# constant to 6000, linear to 1e-4 at 10000, then clamped.
GOLDEN = [
    (0, 0.0),
    (100, 1e-4),
    (500, 5e-4),
    (1_000, 1e-3),
    (3_000, 1e-3),
    (6_000, 1e-3),
    (7_000, 1e-3 - 0.25 * 9e-4),  # 7.75e-4
    (8_000, 5.5e-4),
    (9_000, 3.25e-4),
    (10_000, 1e-4),
    (10_001, 1e-4),
    (10**12, 1e-4),
]


@pytest.mark.parametrize(("tokens", "expected"), GOLDEN)
def test_golden_values(tokens: int, expected: float) -> None:
    assert SCHEDULE.lr_at(tokens) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_function_and_spec_agree() -> None:
    for tokens, _ in GOLDEN:
        assert lr_at(tokens, **SCHEDULE.model_dump()) == SCHEDULE.lr_at(tokens)


def test_never_negative_and_monotone_phases() -> None:
    to_zero = LRSchedule(peak_lr=0.5, total_tokens=1_000, warmdown_tokens=1_000)
    values = [to_zero.lr_at(t) for t in range(0, 3_000, 7)]
    assert min(values) == 0.0
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert to_zero.lr_at(0) == 0.5  # no warmup: starts at the peak


def test_constant_schedule() -> None:
    assert LRSchedule(peak_lr=2e-3, total_tokens=5).lr_at(4) == 2e-3


def test_from_fractions() -> None:
    schedule = LRSchedule.from_fractions(1e-3, 10_000, 0.1, 0.4, 0.1)
    assert schedule == SCHEDULE


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="tokens_trained must be >= 0"):
        SCHEDULE.lr_at(-1)
    with pytest.raises(ValueError, match="exceed total_tokens"):
        LRSchedule(peak_lr=1e-3, total_tokens=100, warmup_tokens=60, warmdown_tokens=60)
    with pytest.raises(ValueError):
        LRSchedule(peak_lr=1e-3, total_tokens=100, final_lr_fraction=1.5)
    with pytest.raises(ValueError, match="extra"):
        LRSchedule(peak_lr=1e-3, total_tokens=100, warmup=5)  # type: ignore[call-arg]
