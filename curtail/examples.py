"""The bundled examples: experiment configs, their real traces and the demo's corpus.

In a checkout they are the repository's ``experiments/`` and ``data/``; an installed wheel
carries the same files under ``<prefix>/share/curtail`` (``[tool.setuptools.data-files]``).
:func:`examples_root` finds them either way, so ``curtail simulate`` and ``curtail run`` without
a config work from any folder; :func:`write_examples` (``curtail init DIR``) copies them into a
folder of the user's own, with the layout the configs' relative paths expect::

    DIR/experiments/*.toml      the configs (paper.toml, demo.toml, sweeps, live demo, ...)
    DIR/data/traces/            WattTime, SGIP and average-intensity traces (README: source, unit, licence)
    DIR/data/text/              Tiny Shakespeare and WikiText-2 (README: source, licence)
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from curtail.config import project_root
from curtail.errors import CurtailError

# What the wheel installs ([tool.setuptools.data-files] in pyproject.toml): the same globs.
PATTERNS = {
    "experiments": ("*.toml",),
    "data/traces": ("*.csv", "*.csv.gz", "README.md"),
    "data/text": ("*.txt", "README.md"),
}


def examples_root() -> Path:
    """The folder holding ``experiments/`` and ``data/``: the checkout's root, else the
    installed copy under ``<prefix>/share/curtail``."""
    for root in (project_root(), Path(sysconfig.get_path("data")) / "share" / "curtail"):
        if (root / "experiments" / "demo.toml").is_file() and (root / "data" / "traces").is_dir():
            return root
    raise CurtailError(
        "curtail's example configs and traces are not installed (neither a checkout nor "
        f"{Path(sysconfig.get_path('data')) / 'share' / 'curtail'}); reinstall the package or pass a config file"
    )


def example_config(name: str) -> Path:
    """``name`` (e.g. ``experiments/paper.toml``) in the working directory if it is there,
    else the bundled one."""
    local = Path(name)
    return local if local.is_file() else examples_root() / name


def write_examples(destination: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the examples into ``destination`` (created if needed); the files written.

    An existing file is an error naming it (nothing is copied) unless ``overwrite``.
    """
    source, destination = examples_root(), Path(destination)
    files = sorted({path for folder, globs in PATTERNS.items() for glob in globs for path in (source / folder).glob(glob)})
    targets = [destination / path.relative_to(source) for path in files]
    existing = [str(target) for target in targets if target.exists()]
    if existing and not overwrite:
        raise CurtailError(f"{existing[0]} already exists ({len(existing)} example files do); "
                           "choose an empty folder or pass --force to overwrite them")
    for path, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return targets
