"""experiments/compare_centralized.py: runs made at once each keep their row of the table."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import sys
import time
from pathlib import Path

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
