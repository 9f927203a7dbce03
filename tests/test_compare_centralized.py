"""experiments/compare_centralized.py: runs made at once each keep their row of the table."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    return importlib.import_module("compare_centralized")


def add_row(table: Path, name: str) -> None:
    with load_script().locked_rows(table) as rows:
        time.sleep(0.2)  # every writer reads before any writes, unless they take turns
        rows[name] = {"variant": name, "final_eval_loss": len(name)}


def test_runs_made_at_once_each_keep_their_row(tmp_path):
    table = tmp_path / "quality" / "comparison.json"
    table.parent.mkdir()
    table.write_text(json.dumps([{"variant": "earlier", "final_eval_loss": 1.0}]))
    names = ["aware", "centralized", "compressed"]
    writers = [multiprocessing.get_context("spawn").Process(target=add_row, args=(table, name)) for name in names]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    rows = {row["variant"]: row for row in json.loads(table.read_text())}
    assert sorted(rows) == sorted(["earlier", *names])
    with load_script().locked_rows(table, write=False) as read:
        read.clear()  # a reader changes nothing on disk
    assert len(json.loads(table.read_text())) == 4


@pytest.mark.parametrize(("text", "variant", "optimizer", "momentum"), [
    ("0.5", "aware-mu0.5", "nesterov", 0.5), ("auto", "aware-auto", "nesterov", "auto"),
    ("average", "aware-average", "average", None)])
def test_an_outer_variant_changes_only_the_outer_optimizer_and_the_run_name(text, variant, optimizer, momentum):
    from curtail.config import load_experiment

    script = load_script()
    experiment = load_experiment(REPO / "experiments/long_rounds.toml")
    made = script.variants(experiment, None, (script.outer_setting(text),))
    changed, run = made[variant]
    assert run == f"curtailment-aware-{variant.removeprefix('aware-')}" and [r.name for r in changed.runs] == [run]
    assert changed.training.outer_optimizer == optimizer
    if momentum is not None:
        assert changed.training.outer_momentum == momentum
    untouched = {"outer_optimizer", "outer_momentum"}
    assert {k: v for k, v in changed.training.model_dump().items() if k not in untouched} == \
        {k: v for k, v in experiment.training.model_dump().items() if k not in untouched}
    assert changed.runs[0].sites == experiment.runs[0].sites and changed.seed == experiment.seed


def test_an_outer_setting_that_is_not_a_number_is_refused():
    with pytest.raises(ValueError):
        load_script().outer_setting("averge")
