"""experiments/momentum_seeds.py: each outer setting changes only the outer optimizer."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from curtail.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


def load_script():
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    return importlib.import_module("momentum_seeds")


@pytest.mark.parametrize(("text", "optimizer", "momentum"), [
    ("auto", "nesterov", "auto"), ("0.5", "nesterov", 0.5), ("average", "average", None)])
def test_an_outer_setting_changes_only_the_outer_optimizer(text, optimizer, momentum):
    script = load_script()
    base = load_experiment(REPO / "experiments/long_rounds.toml").training.replace(outer_momentum=0.3)
    changed = script.with_setting(base, script.momentum(text))
    assert changed.outer_optimizer == optimizer
    if momentum is not None:
        assert changed.outer_momentum == momentum
    untouched = {"outer_optimizer", "outer_momentum"}
    assert {k: v for k, v in changed.model_dump().items() if k not in untouched} == \
        {k: v for k, v in base.model_dump().items() if k not in untouched}


def test_a_setting_that_is_not_a_number_is_refused():
    with pytest.raises(ValueError):
        load_script().momentum("averge")
