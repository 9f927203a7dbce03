"""pip's configuration (pip.conf, PIP_* variables) as ``uv pip install`` arguments, one per line.

scripts/setup.sh installs with uv (seconds) where it can and with pip (minutes) otherwise; both
must see the same indexes, local wheel folders and constraints, so this reads ``pip config
list`` and passes on the keys that decide what is installed. A ``file://`` index or a wheel
folder that does not exist is left out (pip warns about it, uv would stop).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from urllib.parse import urlparse

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def pip_config(python: str) -> dict[str, list[str]]:
    """Each pip setting (its last definition wins, as in pip) split into its values."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = shlex.split(value.strip().strip("'\""))
    return settings


def present(location: str) -> bool:
    parsed = urlparse(location)
    path = parsed.path if parsed.scheme == "file" else location if not parsed.scheme else None
    return path is None or os.path.exists(path)


def main() -> None:
    for key, values in pip_config(sys.argv[1]).items():
        if key in OPTIONS:
            for value in values:
                if present(value):
                    print(OPTIONS[key])
                    print(value)


if __name__ == "__main__":
    main()
