"""The operator's paths: resume, checkpoint fallback, preflight, Ctrl-C, and the CLI's errors.

Fast tests (no Ray): checkpoint manifests and their verification; which checkpoint a resume
picks, what it skips and why, and when it refuses; the ledger journal's account of work lost
over repeated or fallen-back resumes; a completed run's folder left byte for byte as it was;
a config that differs from the run's refused; preflight errors (missing corpus, an output
folder under a regular file, a cluster without the GPUs asked for) before any run folder
exists; one-line CLI errors with their exit codes; ``--json`` keeping stdout to one document.

Slow tests (real Ray): Ctrl-C on ``python -m curtail run`` stops at a checkpoint and exits 130,
and ``--resume --json`` completes it; a resume falls back past a dangling ``LATEST`` and a
truncated checkpoint; a config asking for GPUs the cluster lacks fails at once, by its key.
In each resumed run the journal audit finds nothing trained that the ledger does not account.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from runtime_fixtures import tiny_experiment

from curtail.run_store import RunStore

ROOT = Path(__file__).resolve().parents[1]


class ReachedRay(Exception):
    """Raised by a stand-in for ``connect``: every check before Ray passed."""


@pytest.fixture
def no_ray(monkeypatch):
    """``curtail.run`` stops where it would start Ray."""
    import curtail.runtime.cluster

    def connect(*args, **kwargs):
        raise ReachedRay

    monkeypatch.setattr(curtail.runtime.cluster, "connect", connect)


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_config(experiment: dict, path: Path) -> Path:
    """An experiment dict as a TOML file (inline tables)."""
    path.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in experiment.items()))
    return path


def _state(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``path``: its sha256 and modification time."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Checkpoints: manifest, verification, selection


def _averager_state(value: float = 1.0) -> dict:
    params = {"w": np.full((4, 4), value, dtype=np.float32)}
    return {"version": 1, "num_outer_steps": 1, "params": params,
            "optimizer": {"name": "nesterov", "lr": 0.7, "momentum": 0.9, "momentum_buffers": {"w": params["w"] / 2}}}


def _write(run_dir: Path, sequence: int) -> Path:
    from curtail.runtime.checkpoint import write_checkpoint

    return write_checkpoint(run_dir, sequence, averager_state=_averager_state(sequence), ledger_state={"format": 1},
                            executor_state={"t_s": float(sequence)}, coordinator_state={"journal_seq": 0})


def _journal_trained(run_dir: Path, tokens: int = 256) -> None:
    from curtail.runtime.checkpoint import LedgerJournal

    journal = LedgerJournal(run_dir)
    journal.append("trained", "a", [[0, 0, tokens]], t_s=0.0)
    journal.close()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_checkpoints_carry_checksums_and_verification_names_each_defect(tmp_path):
    from curtail.runtime.checkpoint import MANIFEST, REQUIRED, verify_checkpoint

    path = _write(tmp_path, 1)
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(REQUIRED) <= set(manifest["files"])
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert verify_checkpoint(path) == []

    weights = path / "global.safetensors"
    original = weights.read_bytes()
    _truncate(weights)
    (problem,) = verify_checkpoint(path)
    assert problem.startswith("global.safetensors is truncated")
    flipped = bytearray(original)
    flipped[-1] ^= 0xFF  # same size, one bit of a weight changed
    weights.write_bytes(bytes(flipped))
    assert verify_checkpoint(path) == ["global.safetensors does not match its sha256 in manifest.json"]
    weights.write_bytes(original)
    (path / "ledger.json").unlink()
    assert verify_checkpoint(path) == ["ledger.json is missing"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "000009") == ["the folder is missing"]


def test_a_checkpoint_without_a_manifest_is_checked_by_loading_it(tmp_path):
    from curtail.runtime.checkpoint import MANIFEST, verify_checkpoint

    path = _write(tmp_path, 1)
    (path / MANIFEST).unlink()  # as written before checkpoints carried checksums
    assert verify_checkpoint(path) == []
    _truncate(path / "global.safetensors")
    (problem,) = verify_checkpoint(path)
    assert problem.startswith("global.safetensors does not load")


def test_reading_a_corrupt_checkpoint_names_the_file_at_once(tmp_path):
    from curtail.errors import CheckpointError
    from curtail.runtime.checkpoint import read_checkpoint

    path = _write(tmp_path, 1)
    _truncate(path / "global.safetensors")
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="global.safetensors is unreadable") as error:
        read_checkpoint(path)
    assert str(path / "global.safetensors") in str(error.value)
    assert "--checkpoint N" in str(error.value)
    assert time.perf_counter() - started < 5  # no retries
    path = _write(tmp_path, 2)
    (path / "executor.json").write_text('{"t_s": ')
    with pytest.raises(CheckpointError, match=r"executor.json is unreadable \(Expecting value"):
        read_checkpoint(path)


def test_resume_falls_back_past_a_dangling_pointer_and_a_truncated_checkpoint(tmp_path):
    from curtail.runtime.checkpoint import KEEP, select_checkpoint

    assert KEEP >= 3  # a dangling LATEST and a damaged checkpoint still leave one to resume from
    for sequence in (1, 2, 3):
        _write(tmp_path, sequence)
    root = tmp_path / "checkpoints"
    assert select_checkpoint(tmp_path) == (root / "000003", [])
    for path in (root / "000003").iterdir():
        path.unlink()
    (root / "000003").rmdir()
    _truncate(root / "000002" / "global.safetensors")
    path, skipped = select_checkpoint(tmp_path)
    assert path == root / "000001"
    assert skipped[0] == ("000003", "LATEST names it, but the folder is missing")
    assert skipped[1][0] == "000002" and "global.safetensors is truncated" in skipped[1][1]


def test_a_missing_json_is_skipped_and_latest_is_preferred_when_intact(tmp_path):
    from curtail.runtime.checkpoint import point_latest, select_checkpoint

    for sequence in (1, 2, 3):
        _write(tmp_path, sequence)
    root = tmp_path / "checkpoints"
    (root / "000003" / "coordinator.json").unlink()
    path, skipped = select_checkpoint(tmp_path)
    assert path == root / "000002" and skipped == [("000003", "coordinator.json is missing")]
    point_latest(tmp_path, root / "000001")  # a resume from 1 was chosen: its descendants follow it
    assert select_checkpoint(tmp_path) == (root / "000001", [])


def test_an_explicit_checkpoint_is_used_or_refused_by_name(tmp_path):
    from curtail.errors import CheckpointError
    from curtail.runtime.checkpoint import select_checkpoint

    for sequence in (1, 2, 3):
        _write(tmp_path, sequence)
    root = tmp_path / "checkpoints"
    assert select_checkpoint(tmp_path, 2) == (root / "000002", [])
    assert select_checkpoint(tmp_path, "000001") == (root / "000001", [])
    _truncate(root / "000002" / "outer_momentum.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint 000002 .* outer_momentum.safetensors is truncated"):
        select_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"000007 .*the folder is missing.*000003, 000002, 000001"):
        select_checkpoint(tmp_path, 7)


def test_with_no_intact_checkpoint_a_resume_refuses_unless_nothing_was_trained(tmp_path):
    from curtail.errors import ResumeError
    from curtail.runtime.checkpoint import select_checkpoint

    assert select_checkpoint(tmp_path) == (None, [])  # a run stopped before training: start over
    _write(tmp_path, 1)
    _truncate(tmp_path / "checkpoints" / "000001" / "ledger.json")
    path, skipped = select_checkpoint(tmp_path)
    assert path is None and skipped[0][0] == "000001"
    _journal_trained(tmp_path, 2176)
    with pytest.raises(ResumeError, match=r"no intact checkpoint .*000001: ledger.json is truncated.* 2,176 trained"):
        select_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "000001" / "ledger.json").unlink()
    (tmp_path / "checkpoints" / "000001" / "manifest.json").unlink()
    with pytest.raises(ResumeError, match="start a new run|Start a new run"):
        select_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# The journal's account over repeated and fallen-back resumes


class _Life:
    """One life of a run between crashes: a ledger and the journal it appends to."""

    def __init__(self, run_dir: Path, ledger):
        from curtail.runtime.checkpoint import LedgerJournal

        self.ledger, self.journal = ledger, LedgerJournal(run_dir)
        self.undelivered: dict[str, list] = {}

    def train(self, site: str, tokens: int, deliver: bool = True) -> None:
        token_range = self.ledger.claim(site, tokens)
        self.journal.append("trained", site, [[0, token_range.start, token_range.end]])
        if deliver:
            self.ledger.complete(site, token_range, tokens)
            self.journal.append("delivered", site, [[0, token_range.start, token_range.end]])
        else:
            self.undelivered.setdefault(site, []).append(token_range)

    def fail(self, site: str) -> None:
        """The site dies: its trained, undelivered ranges are re-trained, its claims released."""
        lost = [(r.epoch, r.start, r.end) for r in self.undelivered.pop(site, [])]
        self.ledger.record_retrained(f"site_failure:{site}", lost)
        released = self.ledger.release(site)
        self.journal.append("released", site, [[r.epoch, r.start, r.end] for r in released])

    def checkpoint(self) -> tuple[int, dict]:
        return self.journal.seq, self.ledger.to_dict()

    @classmethod
    def resume(cls, run_dir: Path, checkpoint: tuple[int, dict], name: str) -> _Life:
        from curtail.runtime.checkpoint import JOURNAL, lost_since, read_journal
        from curtail.training.ledger import DataLedger

        mark, saved = checkpoint
        ledger = DataLedger.from_dict(saved)
        ledger.release_all()
        lost = lost_since(read_journal(run_dir / JOURNAL), mark)
        for site, epoch, start, end in lost["site_failures"]:
            ledger.record_retrained(f"site_failure:{site}", [(epoch, start, end)])
        ledger.record_retrained(f"resume:{name}", [tuple(r) for r in lost["ranges"]])
        life = cls(run_dir, ledger)
        life.journal.append("resume", "")
        return life

    def finish(self, run_dir: Path) -> dict:
        from curtail.runtime.checkpoint import audit_journal

        (run_dir / "ledger.json").write_text(json.dumps(self.ledger.to_dict()))
        return audit_journal(run_dir)


def test_two_resumes_from_the_same_checkpoint_count_the_lost_work_each_time(tmp_path):
    from curtail.training.ledger import DataLedger

    life = _Life(tmp_path, DataLedger(total_tokens=400, block_tokens=10))
    life.train("a", 30)
    checkpoint = life.checkpoint()
    life.train("a", 20)  # crash: lost
    life = _Life.resume(tmp_path, checkpoint, "000001")
    life.train("a", 30)  # crash again before a newer checkpoint: this ledger is lost too
    life = _Life.resume(tmp_path, checkpoint, "000001")
    life.train("a", 40)
    audit = life.finish(tmp_path)
    assert audit["mismatched_tokens"] == 0
    assert audit["retrained_tokens"] == 20 + 30


def test_falling_back_to_an_older_checkpoint_after_a_resume_keeps_the_audit_clean(tmp_path):
    from curtail.training.ledger import DataLedger

    life = _Life(tmp_path, DataLedger(total_tokens=400, block_tokens=10))
    life.train("a", 30)
    first = life.checkpoint()
    life.train("a", 20)
    life.train("b", 20)
    second = life.checkpoint()
    life.train("a", 10)  # crash
    life = _Life.resume(tmp_path, second, "000002")
    life.train("b", 20, deliver=False)
    life.fail("b")
    life.train("a", 30)  # crash; checkpoint 2 turns out damaged: fall back to 1
    life = _Life.resume(tmp_path, first, "000001")
    life.train("a", 100)
    assert life.finish(tmp_path)["mismatched_tokens"] == 0


# --------------------------------------------------------------------------------------------
# Resume refusals and preflight (before Ray starts)


def _started_run_dir(tmp_path: Path, experiment: dict, *, completed: bool) -> Path:
    """A run directory as ``curtail run`` leaves it (interrupted, or completed)."""
    from curtail.api import RUN_SPEC_FILE, as_experiment

    run_dir = tmp_path / "runs" / "runtime-test" / "two-sites"
    run_dir.mkdir(parents=True)
    config = as_experiment(experiment)
    (run_dir / RUN_SPEC_FILE).write_text(json.dumps({"experiment": config.model_dump(mode="json"),
                                                     "run": "two-sites"}))
    for sequence in (1, 2):
        _write(run_dir, sequence)
    _journal_trained(run_dir)
    if completed:
        (run_dir / "ledger.json").write_text("{}")
        (run_dir / "model").mkdir()
        (run_dir / "model" / "model.safetensors").write_bytes(b"weights")
        (run_dir / "summary.json").write_text(json.dumps({"run": "two-sites", "tokens": 256}))
    return run_dir


def test_resuming_a_completed_run_refuses_and_changes_nothing(tmp_path, no_ray, capfd):
    import curtail
    from curtail.cli import main
    from curtail.errors import ResumeError

    experiment = tiny_experiment(tmp_path)
    run_dir = _started_run_dir(tmp_path, experiment, completed=True)
    before = _state(run_dir)
    with pytest.raises(ResumeError, match="is a completed run"):
        curtail.run(resume=run_dir)
    config = write_config(experiment, tmp_path / "tiny.toml")
    assert main(["run", str(config), "--resume", str(run_dir)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("curtail: error: ") and err.count("\n") == 1 and "completed run" in err
    assert _state(run_dir) == before


def test_a_config_given_with_resume_must_be_the_runs_own(tmp_path, no_ray):
    import curtail
    from curtail.errors import ResumeError

    experiment = tiny_experiment(tmp_path)
    run_dir = _started_run_dir(tmp_path, experiment, completed=False)
    before = _state(run_dir)
    other = {**experiment, "seed": 8, "training": {**experiment["training"], "batch_size": 4}}
    with pytest.raises(ResumeError, match=r"differs .* at seed, training.batch_size"):
        curtail.run(other, resume=run_dir)
    with pytest.raises(ResumeError, match="not 'other'"):
        curtail.run(resume=run_dir, run="other")
    with pytest.raises(ResumeError, match="output folder does not apply"):
        curtail.run(resume=run_dir, output_dir=tmp_path / "elsewhere")
    with pytest.raises(ResumeError, match="resume=RUN_DIR"):
        curtail.run(experiment, checkpoint=1)
    assert _state(run_dir) == before
    # the run's own config (here as its TOML file) is accepted: the resume goes on to Ray
    with pytest.raises(ReachedRay):
        curtail.run(write_config(experiment, tmp_path / "tiny.toml"), resume=run_dir)
    with pytest.raises(ReachedRay):
        curtail.run(resume=run_dir, checkpoint=1)


def test_a_missing_corpus_is_found_before_ray_and_leaves_no_run_folder(tmp_path, no_ray):
    import curtail
    from curtail.errors import PreflightError

    experiment = tiny_experiment(tmp_path)
    experiment["training"] = {**experiment["training"], "corpus": [str(tmp_path / "missing.txt")],
                              "heldout": [str(tmp_path)]}
    with pytest.raises(PreflightError) as error:
        curtail.run(experiment, output_dir=tmp_path / "runs")
    message = str(error.value)
    assert f"training.corpus[0]: {tmp_path / 'missing.txt'} does not exist" in message
    assert f"training.heldout[0]: {tmp_path} is a folder, not a file" in message
    assert not (tmp_path / "runs").exists()


def test_an_output_folder_under_a_regular_file_is_one_line_and_no_folder(tmp_path, no_ray, capfd):
    from curtail.cli import main

    (tmp_path / "afile").write_text("not a folder")
    config = write_config(tiny_experiment(tmp_path), tmp_path / "tiny.toml")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "afile" / "runs")]) == 2
    err = capfd.readouterr().err
    assert err == (f"curtail: error: output_dir: {tmp_path / 'afile'} is a file, not a folder, so "
                   f"{tmp_path / 'afile' / 'runs' / 'runtime-test'} cannot be created; choose another output "
                   "folder (--output-dir DIR)\n")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_preflight_finds_an_unwritable_cache_and_unreadable_files(tmp_path):
    from curtail.preflight import unreadable_file, unwritable_dir

    assert unwritable_dir(tmp_path / "new" / "deeper") is None
    (tmp_path / "file").write_text("x")
    assert unwritable_dir(tmp_path / "file") == f"{tmp_path / 'file'} is a file, not a folder"
    assert unreadable_file(tmp_path / "file") is None
    if os.geteuid() != 0:  # root reads and writes anything
        (tmp_path / "file").chmod(0)
        assert "cannot be read" in unreadable_file(tmp_path / "file")
        (tmp_path / "locked").mkdir(mode=0o500)
        assert unwritable_dir(tmp_path / "locked" / "cache") == f"{tmp_path / 'locked'} is not writable"


def _node(**resources: float) -> dict:
    return {"Alive": True, "Resources": resources}


def test_cluster_capacity_names_the_key_that_asks_too_much():
    from curtail.config import TrainingConfig
    from curtail.runtime.cluster import capacity_problems

    laptop = [_node(CPU=2, site_a=1, site_b=1)]
    assert capacity_problems(laptop, ["a", "b"], TrainingConfig()) == []
    (gpu,) = capacity_problems(laptop, ["a"], TrainingConfig(gpus_per_worker=1))
    assert gpu.startswith("training.gpus_per_worker = 1: site a needs 1 worker(s) with 1 GPU each, but its "
                          "nodes offer 0 GPU(s)")
    assert "training.gpus_per_worker = 0" in gpu
    shared = [_node(CPU=8, GPU=1, site_a=1, site_b=1)]  # two sites taking turns on one GPU
    assert capacity_problems(shared, ["a", "b"], TrainingConfig(gpus_per_worker=0.5)) == []
    (cpu,) = capacity_problems(laptop, ["b"], TrainingConfig(cpus_per_worker=4))
    assert cpu.startswith("training.cpus_per_worker = 4: site b")
    (workers,) = capacity_problems(laptop, ["a"], TrainingConfig(workers_per_site=2))
    assert workers.startswith("training.workers_per_site = 2: the nodes of site a can host 1")
    (missing,) = capacity_problems([_node(CPU=2, site_a=1, site_c=1), {"Alive": False, "Resources": {"site_b": 1}}],
                                   ["b"], TrainingConfig())
    assert missing.startswith("no node declares site_b")
    two_nodes = [_node(CPU=1, GPU=1, site_a=1), _node(CPU=1, GPU=1, site_a=1), _node(CPU=4)]
    assert capacity_problems(two_nodes, ["a"], TrainingConfig(workers_per_site=2, gpus_per_worker=1)) == []


def test_a_site_scaled_to_zero_is_checked_on_the_nodes_its_autoscaler_may_launch():
    from curtail.config import TrainingConfig
    from curtail.runtime.cluster import capacity_problems

    head = [_node(CPU=0)]  # no site node up: the autoscaler launches them on demand
    node_types = [{"resources": {"CPU": 1, "site_a": 1}, "max_count": 2},
                  {"resources": {"CPU": 1, "site_b": 1}, "max_count": 0}]
    assert capacity_problems(head, ["a"], TrainingConfig(workers_per_site=2), node_types) == []
    (too_many,) = capacity_problems(head, ["a"], TrainingConfig(workers_per_site=3), node_types)
    assert too_many.startswith("training.workers_per_site = 3: the nodes of site a can host 2")
    (never,) = capacity_problems(head, ["b"], TrainingConfig(), node_types)  # max_count 0: never launched
    assert never.startswith("no node declares site_b")


# --------------------------------------------------------------------------------------------
# The CLI


def test_an_interrupted_run_prints_the_resume_command_and_exits_130(tmp_path, monkeypatch, capfd):
    import curtail.api
    from curtail.api import RunInterrupted
    from curtail.cli import main

    def interrupted(*args, **kwargs):
        raise RunInterrupted(tmp_path, "000004")

    monkeypatch.setattr(curtail.api, "run", interrupted)
    assert main(["run", "--json"]) == 130
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == (f"curtail: run interrupted at a safe point, checkpoint 000004 written; continue with: "
                            f"curtail run --resume {tmp_path}\n")

    def keyboard(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(curtail.api, "run", keyboard)
    assert main(["run"]) == 130
    assert capfd.readouterr().err == "curtail: interrupted\n"


def test_checkpoint_without_resume_is_a_usage_error(capfd):
    from curtail.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--checkpoint", "3"])
    assert exit_.value.code == 2
    assert "--checkpoint N picks the checkpoint of a resume" in capfd.readouterr().err


def test_json_output_is_one_document_whatever_else_prints(monkeypatch, capfd):
    import curtail.api
    from curtail.cli import main

    class Result:
        summary: ClassVar[dict] = {"run": "two-sites", "tokens": 256}

    def noisy_run(*args, **kwargs):
        print("a library's print")
        os.write(1, b"a C extension's print\n")
        thread = threading.Thread(target=lambda: print("a log thread's print", flush=True))
        thread.start()
        thread.join()
        return Result()

    monkeypatch.setattr(curtail.api, "run", noisy_run)
    assert main(["run", "--json"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out) == Result.summary
    assert "a library's print" in captured.err and "a C extension's print" in captured.err
    assert "a log thread's print" in captured.err
    print("stdout is back")
    os.write(1, b"fd 1 is back\n")
    assert capfd.readouterr().out == "stdout is back\nfd 1 is back\n"


def test_a_user_error_is_one_line_from_a_real_process(tmp_path):
    (tmp_path / "afile").write_text("")
    config = write_config(tiny_experiment(tmp_path), tmp_path / "tiny.toml")
    done = subprocess.run([sys.executable, "-m", "curtail", "run", str(config), "--resume", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"curtail: error: {tmp_path / 'nope'}: no such run directory\n"


# --------------------------------------------------------------------------------------------
# The driver loop against a fake coordinator: Ctrl-C, a second Ctrl-C, a restart


class _Handle:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def remote(self, *args):
        self.log.append((self.name, args))
        return self.name


class _FakeCoordinator:
    """Stands in for ``Coordinator.options(...).remote(...)``, recording every call."""

    def __init__(self, log: list):
        self.log = log
        self.run, self.progress, self.request_stop = (_Handle(n, log) for n in ("run", "progress", "request_stop"))

    def options(self, **kwargs):
        return self

    def remote(self, *args):
        self.log.append(("start", args))
        return self


@pytest.fixture
def fake_ray(monkeypatch):
    """``curtail.api._train`` driving a fake coordinator: ``script`` says what each
    ``ray.wait`` does (``"wait"``, ``"done"`` or an exception to raise), ``results`` what each
    ``ray.get(run)`` returns or raises."""
    import ray

    import curtail.runtime.cluster
    import curtail.runtime.coordinator
    import curtail.runtime.placement

    log: list = []
    script: list = []
    results: list = []

    def wait(refs, timeout=None):
        step = script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return (refs, []) if step == "done" else ([], refs)

    def get(ref):
        if ref == "progress":
            return {"phase": "training"}
        result = results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(curtail.runtime.coordinator, "Coordinator", _FakeCoordinator(log))
    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor: log.append(("kill",)))
    monkeypatch.setattr(curtail.runtime.cluster, "remove_stale_placement_groups",
                        lambda sites, pinning: log.append(("remove_stale_placement_groups",)) or 0)
    monkeypatch.setattr(curtail.runtime.placement, "control_plane", dict)  # no node to pin to
    return log, script, results


def _artifacts(**kwargs):
    from curtail.runtime.coordinator import RunArtifacts

    return RunArtifacts(trajectory=None, summary_extra={}, **kwargs)


def _drive(run_dir: Path, start_from: Path | None = None, max_restarts: int = 2):
    from curtail.api import _train, as_experiment

    experiment = as_experiment(tiny_experiment(run_dir))
    return _train(experiment, experiment.runs[0], RunStore.at(run_dir), start_from, max_restarts=max_restarts,
                  on_progress=None, progress_interval_s=0.0)


def test_ctrl_c_asks_the_coordinator_to_stop_and_raises_run_interrupted(tmp_path, fake_ray):
    from curtail.api import RunInterrupted

    log, script, results = fake_ray
    script += ["wait", KeyboardInterrupt(), "wait", "done"]
    results.append(_artifacts(interrupted=True, checkpoint="000004"))
    with pytest.raises(RunInterrupted) as error:
        _drive(tmp_path)
    assert (error.value.checkpoint, error.value.graceful) == ("000004", True)
    assert error.value.resume_command == f"curtail run --resume {tmp_path}"
    assert [entry[0] for entry in log] == ["start", "run", "request_stop", "kill"]
    assert log[0][1][2:] == (RunStore.at(tmp_path), None)  # (experiment, run name, run store, checkpoint)


def test_a_second_ctrl_c_stops_at_once_and_names_the_newest_intact_checkpoint(tmp_path, fake_ray):
    from curtail.api import RunInterrupted

    log, script, _results = fake_ray
    for sequence in (1, 2):
        _write(tmp_path, sequence)
    _truncate(tmp_path / "checkpoints" / "000002" / "global.safetensors")  # was being written
    script += [KeyboardInterrupt(), "wait", KeyboardInterrupt()]
    with pytest.raises(RunInterrupted, match="at once; its last checkpoint is 000001; continue with") as error:
        _drive(tmp_path)
    assert error.value.graceful is False
    assert [entry[0] for entry in log] == ["start", "run", "request_stop", "kill", "remove_stale_placement_groups"]


def test_a_dead_coordinator_restarts_from_the_newest_intact_checkpoint(tmp_path, fake_ray):
    import ray

    log, script, results = fake_ray
    for sequence in (1, 2):
        _write(tmp_path, sequence)
    _truncate(tmp_path / "checkpoints" / "000002" / "ledger.json")
    script += ["done", "done"]
    results += [ray.exceptions.RayActorError(), _artifacts()]
    artifacts, restarts = _drive(tmp_path, start_from=tmp_path / "checkpoints" / "000002")
    assert artifacts.interrupted is False
    starts = [entry[1] for entry in log if entry[0] == "start"]
    assert [args[3] for args in starts] == [str(tmp_path / "checkpoints" / "000002"),
                                            str(tmp_path / "checkpoints" / "000001")]
    (restart,) = restarts
    assert restart["checkpoint"] == "000001"
    assert restart["skipped_checkpoints"][0]["checkpoint"] == "000002"


def test_a_dead_coordinator_with_no_checkpoint_to_restart_from_raises(tmp_path, fake_ray):
    import ray

    _log, script, results = fake_ray
    _journal_trained(tmp_path)
    script += ["done"]
    results += [ray.exceptions.RayActorError()]
    with pytest.raises(ray.exceptions.RayActorError):
        _drive(tmp_path)


# --------------------------------------------------------------------------------------------
# Real Ray


def _mid_round(experiment: dict) -> dict:
    """Checkpoints every 240 s of the run's clock, and the run cut at 01:50 (SINGLE, the hand-off
    and federated rounds, with a's leave still ahead): long enough for every fault here."""
    runs = [{**experiment["runs"][0], "deadline": "2026-01-11T01:50:00Z"}]
    return {**experiment, "runs": runs, "training": {**experiment["training"], "checkpoint_interval_s": 240}}


def _checkpoints(run_dir: Path) -> list[str]:
    from curtail.runtime.checkpoint import checkpoint_names

    return checkpoint_names(run_dir)


@pytest.mark.slow
def test_ctrl_c_stops_at_a_checkpoint_and_resume_completes_the_run(ray_cluster, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the process group) on ``python -m curtail run``; both
    commands join the session's cluster with ``--address`` (it is not in their process group)."""
    from curtail.runlog import read_run_dir
    from curtail.runtime.checkpoint import audit_journal, verify_checkpoint

    config = write_config(_mid_round(tiny_experiment(tmp_path)), tmp_path / "tiny.toml")
    run_dir = tmp_path / "runs" / "runtime-test" / "two-sites"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    address = ["--address", ray_cluster.get_runtime_context().gcs_address]
    process = subprocess.Popen([sys.executable, "-m", "curtail", "run", str(config), "--output-dir",
                                str(tmp_path / "runs"), *address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_checkpoints(run_dir)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert process.poll() is None, f"the run ended before it was interrupted:\n{process.stderr.read()}"
        os.killpg(process.pid, signal.SIGINT)
        interrupted_at = time.monotonic()
        _, err = process.communicate(timeout=300)
        stop_s = time.monotonic() - interrupted_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    # the last line curtail writes (Ray's own log lines, e.g. Train's placement-group cleaner
    # shutting down, may still come after it)
    [*_, last] = [line for line in err.strip().splitlines() if line.startswith("curtail:")]
    assert "Traceback" not in err
    assert last.startswith("curtail: run interrupted at a safe point, checkpoint ")
    assert last.endswith(f"continue with: curtail run --resume {run_dir}")
    written = last.split("checkpoint ")[1].split()[0]
    assert written == (run_dir / "checkpoints" / "LATEST").read_text()
    assert verify_checkpoint(run_dir / "checkpoints" / written) == []
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model").exists()

    done = subprocess.run([sys.executable, "-m", "curtail", "run", "--resume", str(run_dir), "--json", *address],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # the whole of stdout is the summary
    assert summary["resumed"] is True and summary["resume_checkpoint"] == written
    assert summary["skipped_checkpoints"] == []
    assert summary["stop_reason"] == "deadline"
    assert summary["tokens"] == summary["ledger_trained_tokens"]
    (resume,) = summary["resumes"]
    assert resume["tokens"] == 0  # stopped at a safe point: nothing to train again
    assert audit_journal(run_dir)["mismatched_tokens"] == 0
    losses = read_run_dir(run_dir).losses
    scored_s = losses.loc[losses["kind"] == "eval", "t_s"]
    assert (scored_s <= resume["checkpoint_t_s"]).any(), "the syncs scored before the checkpoint were lost"
    print(f"Ctrl-C: exit 130 {stop_s:.1f} s after SIGINT, checkpoint {written}; resumed: tokens "
          f"{summary['tokens']}, re-trained {summary['ledger_retrained_tokens']}, held-out loss "
          f"{summary['final_eval_loss']!r}")


@pytest.mark.slow
def test_resume_falls_back_past_a_dangling_pointer_and_a_corrupt_checkpoint(ray_cluster, tmp_path):
    import ray

    import curtail
    from curtail.runtime.checkpoint import audit_journal

    runs = tmp_path / "runs"
    killed: dict = {}

    def kill_coordinator(progress: dict) -> None:
        found = list(runs.glob("*/*/checkpoints"))
        if not killed and progress.get("coordinator_pid") and found and len(_checkpoints(found[0].parent)) >= 3:
            os.kill(progress["coordinator_pid"], signal.SIGKILL)
            killed.update(pid=progress["coordinator_pid"])

    with pytest.raises(ray.exceptions.RayActorError):
        curtail.run(_mid_round(tiny_experiment(tmp_path)), output_dir=runs, on_progress=kill_coordinator,
                    progress_interval_s=0.3, max_restarts=0)
    assert killed
    (run_dir,) = (runs / "runtime-test").iterdir()
    newest, older, oldest = _checkpoints(run_dir)[:3]
    latest = (run_dir / "checkpoints" / "LATEST").read_text()
    assert latest == newest
    for path in (run_dir / "checkpoints" / newest).rglob("*"):  # LATEST now names a missing folder
        if path.is_file():
            path.unlink()
    for path in sorted((run_dir / "checkpoints" / newest).rglob("*"), reverse=True):
        path.rmdir()
    (run_dir / "checkpoints" / newest).rmdir()
    _truncate(run_dir / "checkpoints" / older / "global.safetensors")

    result = curtail.run(resume=run_dir)
    summary = result.summary
    assert summary["resume_checkpoint"] == oldest
    assert [s["checkpoint"] for s in summary["skipped_checkpoints"]] == [newest, older]
    assert summary["skipped_checkpoints"][0]["reason"] == "LATEST names it, but the folder is missing"
    assert "global.safetensors is truncated" in summary["skipped_checkpoints"][1]["reason"]
    assert summary["tokens"] == summary["ledger_trained_tokens"]
    (resume,) = summary["resumes"]
    assert resume["checkpoint"] == oldest and resume["tokens"] > 0  # the work after it, trained again
    assert audit_journal(run_dir)["mismatched_tokens"] == 0
    print(f"fallback: resumed from {oldest} (skipped {newest}, {older}); re-trained {resume['tokens']} tokens "
          f"{resume.get('lost_ranges')}, run clock rewound {resume['virtual_s_lost']:.0f} s; "
          f"tokens {summary['tokens']}, held-out loss {summary['final_eval_loss']!r}")


@pytest.mark.slow
def test_gpus_the_cluster_lacks_are_an_error_naming_the_key(ray_cluster, tmp_path):
    import curtail
    from curtail.errors import PreflightError

    experiment = tiny_experiment(tmp_path)
    experiment["training"] = {**experiment["training"], "gpus_per_worker": 64}  # more than any machine here
    started = time.perf_counter()
    with pytest.raises(PreflightError, match=r"training.gpus_per_worker = 64: site a needs 1 worker"):
        curtail.run(experiment, output_dir=tmp_path / "runs")
    print(f"missing GPU: refused {time.perf_counter() - started:.2f} s after curtail.run was called")
    assert not (tmp_path / "runs").exists()  # no orphan run folder
