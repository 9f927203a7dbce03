"""scripts/uv_args.py: uv installs from what pip is configured with (indexes, wheel folders,
constraints), and leaves out local locations that do not exist."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("uv_args", REPO / "scripts" / "uv_args.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pips_settings_become_uv_arguments(tmp_path, monkeypatch, capsys):
    script = load_script()
    wheels, simple = tmp_path / "wheels", tmp_path / "simple"
    wheels.mkdir()
    simple.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    listed = (f"global.cert='/etc/ssl/certs/ca.crt'\n"
              f"global.constraint='{constraints}'\n"
              f"global.extra-index-url='file://{simple} file://{tmp_path}/missing https://example.org/simple'\n"
              f"global.find-links='{tmp_path}/gone'\n"
              f":env:.find-links='{wheels}'\n"
              f":env:.default-timeout='180'\n")

    def pip_config_list(command, **kwargs):
        assert command[1:] == ["-m", "pip", "config", "list"]
        return subprocess.CompletedProcess(command, 0, stdout=listed, stderr="")

    monkeypatch.setattr(subprocess, "run", pip_config_list)
    monkeypatch.setattr("sys.argv", ["uv_args.py", "python"])
    script.main()
    assert capsys.readouterr().out.splitlines() == [
        "--constraint", str(constraints),
        "--extra-index-url", f"file://{simple}", "--extra-index-url", "https://example.org/simple",
        "--find-links", str(wheels),
    ]
