"""Learning-rate schedule: one global schedule indexed by the tokens trained across all sites.

Every site asks the same question — "how many tokens has the whole run trained?" — so sites
joining, leaving and training at different speeds all follow one schedule:

- linear **warmup** from 0 to ``peak_lr`` over the first ``warmup_tokens``;
- **constant** ``peak_lr``;
- linear **warmdown** over the last ``warmdown_tokens`` to ``final_lr_fraction * peak_lr``,
  reached at ``total_tokens``;
- **clamped**: past ``total_tokens`` the learning rate stays at its final value (the prior
  system's schedule went negative past its last step; this one cannot).

Evaluate it at the tokens trained once the step is done (``tokens_before + step_tokens``),
so the very first step does not run at learning rate 0.

Pure Python (no torch). Example::

    schedule = LRSchedule(peak_lr=3e-3, total_tokens=10_000_000, warmup_tokens=500_000,
                          warmdown_tokens=2_000_000, final_lr_fraction=0.1)
    lr = schedule.lr_at(ledger.trained_tokens + batch_tokens)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


def lr_at(
    tokens_trained: float,
    *,
    peak_lr: float,
    total_tokens: float,
    warmup_tokens: float = 0,
    warmdown_tokens: float = 0,
    final_lr_fraction: float = 0.0,
) -> float:
    """Learning rate after ``tokens_trained`` tokens (see the module doc for the shape).

    Raises ``ValueError`` for a negative token count or inconsistent arguments.
    """
    _validate(peak_lr, total_tokens, warmup_tokens, warmdown_tokens, final_lr_fraction)
    if tokens_trained < 0:
        raise ValueError(
            f"tokens_trained must be >= 0, got {tokens_trained}; pass the run's total trained tokens"
        )
    tokens = min(float(tokens_trained), float(total_tokens))
    final_lr = final_lr_fraction * peak_lr
    warmdown_start = total_tokens - warmdown_tokens
    if warmdown_tokens > 0 and tokens >= warmdown_start:
        progress = (tokens - warmdown_start) / warmdown_tokens
        return peak_lr + (final_lr - peak_lr) * progress
    if warmup_tokens > 0 and tokens < warmup_tokens:
        return peak_lr * tokens / warmup_tokens
    return peak_lr


class LRSchedule(BaseModel):
    """Warmup / constant / warmdown schedule over ``total_tokens``. Frozen; validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    peak_lr: float = Field(gt=0, description="learning rate of the constant phase")
    total_tokens: int = Field(gt=0, description="tokens at which the warmdown ends")
    warmup_tokens: int = Field(default=0, ge=0)
    warmdown_tokens: int = Field(default=0, ge=0)
    final_lr_fraction: float = Field(default=0.0, ge=0, le=1, description="final lr / peak_lr")

    @model_validator(mode="after")
    def _check_phases(self) -> LRSchedule:
        _validate(
            self.peak_lr, self.total_tokens, self.warmup_tokens, self.warmdown_tokens,
            self.final_lr_fraction,
        )
        return self

    @classmethod
    def from_fractions(
        cls,
        peak_lr: float,
        total_tokens: int,
        warmup_fraction: float = 0.0,
        warmdown_fraction: float = 0.0,
        final_lr_fraction: float = 0.0,
    ) -> LRSchedule:
        """Phases given as fractions of ``total_tokens`` (rounded to whole tokens)."""
        return cls(
            peak_lr=peak_lr,
            total_tokens=total_tokens,
            warmup_tokens=round(warmup_fraction * total_tokens),
            warmdown_tokens=round(warmdown_fraction * total_tokens),
            final_lr_fraction=final_lr_fraction,
        )

    def lr_at(self, tokens_trained: float) -> float:
        """Learning rate after ``tokens_trained`` tokens across all sites."""
        return lr_at(
            tokens_trained,
            peak_lr=self.peak_lr,
            total_tokens=self.total_tokens,
            warmup_tokens=self.warmup_tokens,
            warmdown_tokens=self.warmdown_tokens,
            final_lr_fraction=self.final_lr_fraction,
        )


def _validate(
    peak_lr: float,
    total_tokens: float,
    warmup_tokens: float,
    warmdown_tokens: float,
    final_lr_fraction: float,
) -> None:
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if not total_tokens > 0:
        raise ValueError(f"total_tokens must be > 0, got {total_tokens}")
    if warmup_tokens < 0 or warmdown_tokens < 0:
        raise ValueError(
            f"warmup_tokens ({warmup_tokens}) and warmdown_tokens ({warmdown_tokens}) must be >= 0"
        )
    if warmup_tokens + warmdown_tokens > total_tokens:
        raise ValueError(
            f"warmup_tokens ({warmup_tokens}) + warmdown_tokens ({warmdown_tokens}) exceed "
            f"total_tokens ({total_tokens}); shorten a phase or train longer"
        )
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction}")
