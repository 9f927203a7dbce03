"""The CLI's error paths, walked one by one: each mistake a user can make is one
``curtail: error: ...`` message naming what to fix (an invalid config lists its problems on
indented lines below it), exit code 2, nothing on stdout, no traceback.
In process (``curtail.cli.main``) and without Ray: every one is refused before a cluster starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from curtail.cli import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.toml"


def project(tmp_path: Path) -> Path:
    """A copy of the demo's config next to its data, to break one thing at a time."""
    (tmp_path / "experiments").mkdir()
    shutil.copytree(REPO / "data" / "traces", tmp_path / "data" / "traces")
    shutil.copytree(REPO / "data" / "text", tmp_path / "data" / "text")
    config = tmp_path / "experiments" / "demo.toml"
    shutil.copyfile(DEMO, config)
    return config


def edit(config: Path, old: str, new: str) -> Path:
    text = config.read_text()
    assert old in text, old
    config.write_text(text.replace(old, new, 1))
    return config


CASES = {
    "a missing config file": (lambda c: ["simulate", str(c.parent / "nope.toml")], "nope.toml: no such config file"),
    "a typo'd key": (lambda c: ["simulate", str(edit(c, "hysteresis_s = 600", "hysteresis = 600"))], "hysteresis"),
    "a negative budget": (lambda c: ["simulate", str(edit(c, "token_budget = 300_000", "token_budget = -5"))],
                          "token_budget"),
    "not TOML": (lambda c: ["simulate", str(edit(c, "[rules]", "[rules"))], "not valid TOML"),
    "a missing trace": (lambda c: ["simulate", str(edit(c, "4regions.csv", "5regions.csv"))], "5regions.csv"),
    "a region the trace lacks": (lambda c: ["simulate", str(edit(c, 'region = "SPP_TX"', 'region = "SPP_TEXAS"'))],
                                 "SPP_TEXAS"),
    "an unknown preset": (lambda c: ["run", str(edit(c, 'preset = "small"', 'preset = "huge"'))], "preset"),
    "a missing corpus": (lambda c: ["run", str(edit(c, "tinyshakespeare.txt", "shakespeare.txt"))],
                         "shakespeare.txt"),
    "a PUE below one": (lambda c: ["simulate", str(edit(c, "tokens_per_s = 4.682  #", "pue = 0.8\ntokens_per_s = 4.682  #"))],
                        "pue"),
    "a resume of nothing": (lambda c: ["run", "--resume", str(c.parent / "no-run")], "no such run directory"),
    "a report of a folder without runs": (lambda c: ["report", str(c.parent)], "run director"),
    "a sweep without [sweep]": (lambda c: ["sweep", str(c)], "no [sweep] section"),
    "init into a folder that has the examples": (lambda c: ["init", str(c.parent.parent)], "--force"),
    "prepare-data of a missing file": (lambda c: ["prepare-data", str(c.parent / "none.txt"), "--output",
                                                  str(c.parent / "shards")], "none.txt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_and_exit_2(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    arguments, expected = CASES[case]
    code = main(arguments(project(tmp_path)))
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR, (case, err)
    assert out == ""
    first, *details = err.rstrip("\n").split("\n")  # a config's problems follow, one indented line each
    assert first.startswith("curtail: error: ") and all(line.startswith("  ") for line in details), err
    assert "Traceback" not in err and expected in err, err
