"""experiments/python_corpus.py: split by package (nothing leaks), caps respected, manifest true."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    return importlib.import_module("python_corpus")


def make_site_packages(root: Path) -> None:
    for package, count in (("alpha", 3), ("beta", 2), ("gamma", 2)):
        for index in range(count):
            path = root / package / ("sub" if index else "") / f"m{index}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# {package} {index}\n" + "x = 1\n" * 50)
    (root / "single.py").write_text("# single\n")
    (root / "alpha-1.0.dist-info").mkdir()
    (root / "alpha-1.0.dist-info" / "skip.py").write_text("# metadata, not a package\n")
    (root / "beta" / "latin1.py").write_bytes(b"# beta \xe9\n")  # not UTF-8: skipped


def test_held_out_packages_never_reach_the_training_text(tmp_path: Path, monkeypatch) -> None:
    script = load_script()
    make_site_packages(tmp_path / "site")
    out = tmp_path / "corpus"
    monkeypatch.setattr(sys, "argv", ["python_corpus.py", "--output", str(out), "--root", str(tmp_path / "site"),
                                      "--heldout-packages", "beta", "missing"])
    script.main()
    train, heldout = (out / "train.txt").read_text(), (out / "heldout.txt").read_text()
    assert "# beta" not in train and "# alpha 0" in train and "# gamma 1" in train and "# single" in train
    assert "# beta 0" in heldout and "# beta 1" in heldout and "# alpha" not in heldout
    assert "metadata" not in train + heldout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["heldout"]["packages"] == ["beta"] and manifest["heldout"]["skipped"] == 1
    assert manifest["train"]["packages"] == ["alpha", "gamma", "single"]
    assert manifest["train"]["bytes"] == len(train.encode())


def test_the_training_cap_stops_at_whole_files_and_names_the_packages_reached(tmp_path: Path, monkeypatch) -> None:
    script = load_script()
    make_site_packages(tmp_path / "site")
    out = tmp_path / "corpus"
    one_file_mb = (len("# alpha 0\n" + "x = 1\n" * 50) + 2) / (1 << 20)
    monkeypatch.setattr(sys, "argv", ["python_corpus.py", "--output", str(out), "--root", str(tmp_path / "site"),
                                      "--heldout-packages", "beta", "--max-train-mb", str(2.5 * one_file_mb),
                                      "--in-package-order"])
    script.main()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["files"] == 2 and manifest["train"]["packages"] == ["alpha"]
    assert (out / "train.txt").read_text().count("# alpha") == 2


def test_the_training_files_are_shuffled_by_seed_and_none_is_lost(tmp_path: Path, monkeypatch) -> None:
    script = load_script()
    make_site_packages(tmp_path / "site")

    def first_lines(*options: str) -> list[str]:
        out = tmp_path / "-".join(options)
        monkeypatch.setattr(sys, "argv", ["python_corpus.py", "--output", str(out), "--root", str(tmp_path / "site"),
                                          "--heldout-packages", "beta", *options])
        script.main()
        return [line for line in (out / "train.txt").read_text().splitlines() if line.startswith("# ")]

    in_order = first_lines("--in-package-order")
    assert in_order == ["# alpha 0", "# alpha 1", "# alpha 2", "# gamma 0", "# gamma 1", "# single"]
    shuffled = first_lines("--seed", "0")
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    assert first_lines("--seed", "0") == shuffled and first_lines("--seed", "1") != shuffled


def test_no_installed_held_out_package_is_an_error_that_says_what_to_pass(tmp_path: Path, monkeypatch) -> None:
    script = load_script()
    make_site_packages(tmp_path / "site")
    monkeypatch.setattr(sys, "argv", ["python_corpus.py", "--output", str(tmp_path / "c"), "--root",
                                      str(tmp_path / "site"), "--heldout-packages", "sympy"])
    with pytest.raises(SystemExit, match="--heldout-packages"):
        script.main()
