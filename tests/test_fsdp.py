"""FSDP2 inside a site, on two gloo ranks (CPU processes): the same training as plain data
parallelism, with each rank holding only its rows of every parameter and moment."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp
from fsdp_ranks import STEPS, train_both_ways


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(train_both_ways, args=(2, port, str(out)), nprocs=2, join=True)
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]


def test_fsdp_trains_as_ddp_does_over_20_steps(ranks) -> None:
    ddp, fsdp = ranks[0]["ddp"], ranks[0]["fsdp"]
    assert len(fsdp["losses"]) == STEPS and fsdp["losses"][-1] < fsdp["losses"][0] - 0.5  # it learns
    np.testing.assert_allclose(fsdp["losses"], ddp["losses"], rtol=1e-4)
    for name, array in ddp["params"].items():
        np.testing.assert_allclose(fsdp["params"][name], array, atol=1e-5, err_msg=name)
    assert ranks[1]["fsdp"]["losses"] == fsdp["losses"]  # the mean over ranks, on every rank


def test_the_fused_lm_head_and_loss_train_under_fsdp_as_ddp_does(ranks) -> None:
    """The chunked head + cross-entropy reads the head's weight outside the model's forward; under
    FSDP it runs inside the root's call, so the weight is gathered and its gradient reduced."""
    ddp, fused = ranks[0]["ddp_fused"], ranks[0]["fsdp_fused"]
    np.testing.assert_allclose(fused["losses"], ranks[0]["ddp"]["losses"], rtol=1e-4)  # the same function
    np.testing.assert_allclose(fused["losses"], ddp["losses"], rtol=1e-5)
    for name, array in ddp["params"].items():  # the head and the embeddings were trained too
        np.testing.assert_allclose(fused["params"][name], array, atol=1e-5, err_msg=name)
    assert ranks[1]["fsdp_fused"]["losses"] == fused["losses"]
    assert np.isfinite(fused["heldout"])  # the model's own forward still evaluates


def test_each_rank_holds_and_sends_only_its_rows(ranks) -> None:
    params = ranks[0]["fsdp"]["params"]
    total = sum(array.size for array in params.values())
    moments = [rank["fsdp"]["local_moment_numel"] for rank in ranks]
    assert sum(moments) == total and max(moments) < 0.6 * total  # each rank's AdamW holds about half
    for name, array in params.items():
        rows = [rank["fsdp"]["rows"][name] for rank in ranks]
        assert rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == array.shape[0]
        # the pseudo-gradient's rows of both ranks make up the whole tensor's (start − now)
        joined = np.concatenate([rank["fsdp"]["pseudo_gradient_rows"][name] for rank in ranks])
        np.testing.assert_allclose(joined, ranks[0]["fsdp"]["start"][name] - array, atol=1e-6, err_msg=name)


def test_the_fingerprint_is_the_whole_models_and_an_optimizer_round_trip_is_exact(ranks) -> None:
    for rank in ranks:
        trained, restored = rank["fsdp"]["round_trip"]
        assert trained == restored  # the same step from the saved AdamW shard
    assert ranks[0]["fsdp"]["fingerprint"] == ranks[1]["fsdp"]["fingerprint"]


@pytest.mark.slow
def test_sharded_sites_drain_die_and_resume_with_an_exact_ledger(ray_cluster, tmp_path) -> None:
    """Two sites of two gloo ranks each under FSDP on the tiny trace: a's window closes (a drain:
    each rank saves its own shard of AdamW), site b's rank 0 is killed mid-round (its group is
    lost, it re-provisions), then the coordinator is killed (the run resumes itself from its
    checkpoint: the sharded inner optimizers come back rank by rank). Every token is in the ledger
    once, the work lost at each fault is journaled and trained again, and every sync leaves the
    sites with one set of weights."""
    import json
    import os
    import signal

    from runtime_fixtures import tiny_experiment

    import curtail
    from curtail.runtime.checkpoint import audit_journal

    killed: list[dict] = []

    def kill_b_then_the_coordinator(progress: dict) -> None:
        if progress.get("mode") != "FEDERATED" or len(killed) == 2:
            return
        pid = progress["site_pids"].get("b") if not killed else progress.get("coordinator_pid")
        if pid and progress.get("tokens", 0) > (4000 if not killed else killed[0]["tokens"] + 3000):
            os.kill(pid, signal.SIGKILL)
            killed.append({"pid": pid, "tokens": progress["tokens"]})

    experiment = tiny_experiment(tmp_path)
    experiment["runs"][0]["deadline"] = "2026-01-11T02:20:00Z"  # after a's window closed (02:00)
    experiment["training"] = {**experiment["training"], "parallelism": "fsdp", "workers_per_site": 2,
                              "checkpoint_interval_s": 240}  # the coordinator dies mid-round: work is lost
    result = curtail.run(experiment, output_dir=tmp_path / "runs", on_progress=kill_b_then_the_coordinator,
                         progress_interval_s=0.3)
    summary, events = result.summary, result.record.events
    assert len(killed) == 2, f"the faults were not injected: {killed}"
    assert summary["site_failures"] == 1 and len(summary["resumes"]) == 1
    assert "a" in set(events.query("event == 'drain'").site)  # a's window closed while b trained on
    # the ledger: every trained token once, the lost work journaled and trained again
    assert summary["tokens"] == summary["ledger_trained_tokens"] > 0
    assert summary["ledger_trained_by_site"] == {k: int(v) for k, v in summary["tokens_by_site"].items()}
    # (whether a fault loses work depends on where it lands: a crash at a safe point loses nothing)
    causes = {cause.split(":")[0] for cause, *_ in summary["ledger_retrained"]}
    assert causes <= {"site_failure", "resume"}
    assert summary["ledger_retrained_tokens"] == sum(end - start for _, _, start, end in summary["ledger_retrained"])
    assert summary["ledger_retrained_tokens"] == (summary["tokens_lost_to_failures"]
                                                  + sum(resume["tokens"] for resume in summary["resumes"]))
    assert audit_journal(result.run_dir)["mismatched_tokens"] == 0
    # the resumed sites took their sharded AdamW back, every rank its own shard
    restored = list(events.query("event == 'inner_optimizer_restored'").details.map(json.loads))
    assert len(restored) == 1 and restored[0]["sites"]
    timings = result.record.timings
    assert (timings.kind == "load_optimizer").sum() >= len(restored[0]["sites"])
    # a drained window leaves each rank's own half of the site's AdamW for the next one
    moments_bytes = 2 * 4 * summary["num_parameters"]
    for site in ("a", "b"):
        saved = sorted(p for p in (result.run_dir / "ray_train").glob(f"*-{site}/checkpoint_*") if p.is_dir())
        assert saved, f"site {site} left no window checkpoint"
        sizes = [(saved[-1] / f"inner_optimizer_rank{rank}.pt").stat().st_size for rank in (0, 1)]
        assert all(0.4 < size / moments_bytes < 0.6 for size in sizes), (sizes, moments_bytes)
    assert summary["weight_digests"] and all(len(entry["digests"]) == 1 for entry in summary["weight_digests"])
    assert np.isfinite(summary["final_eval_loss"])
