"""A run directory on object storage: the working copy, uploads, pulls, against a local S3 server
(moto on 127.0.0.1); the slow test runs, kills and resumes a real run there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from runtime_fixtures import STEP_TOKENS, tiny_experiment

from curtail.errors import StorageError
from curtail.run_store import (
    BackgroundUpload,
    RunStore,
    is_uri,
    join,
    open_location,
    read_bytes,
    redact,
    write_bytes,
)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # working copies go to runs/.remote under the working directory
    return tmp_path


def _remote_files(uri: str) -> dict[str, bytes]:
    filesystem, root = open_location(uri)
    found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    result = {}
    for info in found:
        if info.type == pafs.FileType.File:
            try:
                with filesystem.open_input_stream(info.path) as source:
                    result[info.path[len(root) + 1:]] = source.read()
            except OSError as error:  # a live run removed it since the listing (a fetched staging folder):
                # at the open (FileNotFoundError) or, S3 being S3, at the read (RESOURCE_NOT_FOUND,
                # NO_SUCH_KEY)
                if isinstance(error, FileNotFoundError) or any(code in str(error) for code in ("NOT_FOUND",
                                                                                              "NO_SUCH_KEY")):
                    continue
                raise
    return result


def _checkpoint(store: RunStore, name: str, payload: bytes) -> Path:
    folder = store.local / "checkpoints" / name
    (folder / "inner" / "a").mkdir(parents=True)
    (folder / "inner" / "a" / "rank0.pt").write_bytes(payload)
    (folder / "global.safetensors").write_bytes(payload * 2)
    (folder / "manifest.json").write_text(json.dumps({"sequence": int(name)}))
    (store.local / "checkpoints" / "LATEST").write_text(name)
    return folder


def test_locations_uris_and_credentials_are_told_apart():
    assert is_uri("s3://bucket/runs") and is_uri("gs://b/x") and not is_uri("/tmp/runs")
    assert not is_uri("runs/demo") and not is_uri("file:///tmp/x") and not is_uri("C:/runs")
    uri = "s3://KEY:SECRET@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact(uri) == "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join(uri, "demo", "/caiso/") == ("s3://KEY:SECRET@bucket/runs/demo/caiso"
                                           "?endpoint_override=127.0.0.1:9000&scheme=http")
    assert join("/tmp/runs/", "a") == "/tmp/runs/a"


def test_a_local_run_directory_is_its_own_durable_copy(tmp_path):
    store = RunStore.at(tmp_path / "run")
    assert store.remote is None and store.name == str(tmp_path / "run")
    assert store.location(store.local / "ray_train") == str(tmp_path / "run" / "ray_train")
    write_bytes(store.location(store.local / "checkpoints" / ".inner-000001" / "a" / "rank0.pt"), b"state")
    assert read_bytes(str(store.local / "checkpoints" / ".inner-000001" / "a" / "rank0.pt")) == b"state"
    assert read_bytes(str(store.local / "missing.pt")) is None
    store.push_checkpoint(store.local / "checkpoints")  # nothing to upload: no error, nothing moved
    assert sorted(p.name for p in (store.local / "checkpoints").iterdir()) == [".inner-000001"]


def test_a_checkpoint_goes_up_whole_and_old_ones_leave(in_tmp, s3_server):
    store = RunStore.at(s3_server.format(path="runs/exp/first"))
    assert store.local == in_tmp / "runs" / ".remote" / "s3" / "curtail-runs" / "runs" / "exp" / "first"
    assert "testing" not in store.name and not store.exists()
    store.local.mkdir(parents=True)
    (store.local / "run.json").write_text("{}")
    (store.local / "ledger_journal.jsonl").write_text('{"seq": 1}\n')
    store.push_checkpoint(_checkpoint(store, "000001", b"one"))
    second = _checkpoint(store, "000002", b"two")
    shutil.rmtree(store.local / "checkpoints" / "000001")  # the working copy keeps only the newest
    store.push_checkpoint(second)
    remote = _remote_files(store.remote)
    assert sorted(remote) == ["checkpoints/000002/global.safetensors", "checkpoints/000002/inner/a/rank0.pt",
                              "checkpoints/000002/manifest.json", "checkpoints/LATEST", "ledger_journal.jsonl",
                              "run.json"]
    assert remote["checkpoints/LATEST"] == b"000002" and remote["checkpoints/000002/inner/a/rank0.pt"] == b"two"
    assert store.exists()


def test_a_site_writes_to_the_uri_and_the_checkpoint_takes_it_into_the_working_copy(in_tmp, s3_server):
    store = RunStore.at(s3_server.format(path="runs/exp/sites"))
    staged = store.local / "checkpoints" / ".inner-000003"
    write_bytes(join(store.location(staged), "b", "rank1.pt"), b"adam moments")
    assert not staged.exists()
    assert store.fetch("checkpoints/.inner-000003") == staged
    assert (staged / "b" / "rank1.pt").read_bytes() == b"adam moments"
    store.remove("checkpoints/.inner-000003")
    assert _remote_files(store.remote) == {}
    assert read_bytes(join(store.location(staged), "b", "rank1.pt")) is None
    # the averaging actors' parts: several files straight in the folder
    parts = store.local / "checkpoints" / ".averager-000003"
    for index in range(4):
        write_bytes(join(store.location(parts), f"global-{index:05d}-of-00004.safetensors"), bytes([index]) * 1000)
    assert store.fetch("checkpoints/.averager-000003") == parts
    assert sorted(p.read_bytes()[:1] for p in parts.iterdir()) == [bytes([index]) for index in range(4)]


def test_a_pull_replaces_the_working_copy_with_the_remote_run(in_tmp, s3_server):
    store = RunStore.at(s3_server.format(path="runs/exp/pulled"))
    store.local.mkdir(parents=True)
    (store.local / "run.json").write_text('{"run": "pulled"}')
    (store.local / "model").mkdir()
    (store.local / "model" / "weights.bin").write_bytes(b"big")
    store.push_checkpoint(_checkpoint(store, "000004", b"four"))
    store.push_run()
    assert "model/weights.bin" in _remote_files(store.remote)
    shutil.rmtree(store.local)
    (store.local / "stale").mkdir(parents=True)  # a working copy left by someone else: replaced
    store.pull()
    pulled = sorted(p.relative_to(store.local).as_posix() for p in store.local.rglob("*") if p.is_file())
    assert pulled == ["checkpoints/000004/global.safetensors", "checkpoints/000004/inner/a/rank0.pt",
                      "checkpoints/000004/manifest.json", "checkpoints/LATEST", "run.json"]  # no model/


def test_the_journal_goes_up_as_it_grows(in_tmp, s3_server):
    store = RunStore.at(s3_server.format(path="runs/exp/journal"))
    store.local.mkdir(parents=True)
    uploads = BackgroundUpload(store)
    journal = store.local / "ledger_journal.jsonl"
    with journal.open("a") as out:
        for seq in range(50):
            out.write(json.dumps({"seq": seq}) + "\n")
            out.flush()
            uploads.changed("ledger_journal.jsonl")
    uploads.close()
    assert uploads.failures == 0
    assert _remote_files(store.remote)["ledger_journal.jsonl"] == journal.read_bytes()


def test_storage_that_cannot_be_reached_or_holds_no_run_is_one_clear_error(in_tmp, s3_server):
    with pytest.raises(StorageError, match="not a storage location pyarrow.fs can open"):
        RunStore.at("s3://bucket/runs?no_such_option=1")
    with pytest.raises(StorageError, match=r"s3://curtail-runs/runs/exp/nothing-here\?.*: no run directory there"):
        RunStore.at(s3_server.format(path="runs/exp/nothing-here")).pull()


BUDGET_TOKENS = 100 * STEP_TOKENS  # two thirds of what the trace's windows hold: the budget ends the run


@pytest.mark.slow
def test_a_run_on_object_storage_resumes_on_a_fresh_machine_after_its_coordinator_is_killed(
        ray_cluster, in_tmp, s3_server):
    """A real run with its run directory and its corpus (token shards) on the local S3 server;
    its coordinator is SIGKILLed after two checkpoints (no restarts); the working copy is deleted
    (another machine); the resume from the URI alone trains to the budget with every token
    accounted, each once."""
    import ray

    import curtail
    from curtail.runtime.checkpoint import audit_journal
    from curtail.training.prepare import prepare_shards

    root = s3_server.format(path="runs")
    experiment = tiny_experiment(in_tmp)
    training = dict(experiment["training"])
    shards = s3_server.format(path="shards/tiny")  # small shards: every site reads several, across edges
    prepare_shards(training.pop("corpus"), shards, vocab_size=training.pop("vocab_size"), shard_tokens=3001,
                   cache_dir=in_tmp / "cache")
    experiment["training"] = {**training, "checkpoint_inner_optimizer": True, "corpus_shards": shards}
    experiment["token_budget"] = BUDGET_TOKENS
    run_uri = join(root, experiment["name"], experiment["runs"][0]["name"])
    killed: dict = {}

    def kill_coordinator(progress: dict) -> None:
        checkpoints = [name for name in _remote_files(run_uri) if name.endswith("/manifest.json")]
        if not killed and progress.get("coordinator_pid") and len(checkpoints) >= 2:
            os.kill(progress["coordinator_pid"], signal.SIGKILL)
            killed.update(pid=progress["coordinator_pid"], checkpoints=len(checkpoints))

    with pytest.raises(ray.exceptions.RayActorError):
        curtail.run(experiment, output_dir=root, on_progress=kill_coordinator, progress_interval_s=0.3,
                    max_restarts=0)
    assert killed
    uploaded = _remote_files(run_uri)
    latest = uploaded["checkpoints/LATEST"].decode()
    assert f"checkpoints/{latest}/global.safetensors" in uploaded
    assert any(name.startswith(f"checkpoints/{latest}/inner/") for name in uploaded)  # the sites' AdamW
    assert any(name.startswith("ray_train/") for name in uploaded)  # Ray Train wrote to the bucket
    shutil.rmtree(in_tmp / "runs")  # a fresh machine: nothing but the URI

    started = time.perf_counter()
    result = curtail.run(resume=run_uri)
    summary = result.summary
    assert summary["resumed"] is True and summary["resume_checkpoint"] == latest
    assert summary["stop_reason"] == "budget_reached" and summary["tokens"] == BUDGET_TOKENS
    assert summary["run_store"] == run_uri.replace("testing:testing@", "")
    assert summary["tokens"] == summary["ledger_trained_tokens"] == pytest.approx(
        sum(summary["ledger_trained_by_site"].values()))
    (resume,) = summary["resumes"]
    assert resume["checkpoint"] == latest
    assert audit_journal(result.run_dir)["mismatched_tokens"] == 0
    done = _remote_files(run_uri)
    assert json.loads(done["summary.json"])["tokens"] == summary["tokens"]
    assert any(name.startswith("model/") for name in done)
    print(f"object storage: killed after {killed['checkpoints']} checkpoints; resumed from {latest} on a fresh "
          f"working copy in {time.perf_counter() - started:.1f} s; re-trained {resume['tokens']} tokens; "
          f"{len(done)} files in the bucket")
