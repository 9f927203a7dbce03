"""Whole-run checkpoints and resume: the state machine, the files, and real crashes.

Fast tests: a simulated run snapshotted half-way and resumed in a fresh executor ends exactly
like the uninterrupted one; checkpoint folders round-trip and a torn one is refused.
Slow test (real local Ray cluster): the coordinator, then the averaging actor, is killed
mid-round and the run resumes by itself from its last checkpoint each time: every ledger range is
trained once, tokens trained = tokens accounted, and the final held-out loss matches the
uninterrupted run. (A run left interrupted and continued with ``curtail.run(resume=RUN_DIR)``:
tests/test_reliability.py, after a crash and after Ctrl-C.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import STEP_S, STEP_TOKENS, tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
ROUND_TOKENS = 2 * round(600 / STEP_S) * STEP_TOKENS  # one 600-s round at both tiny sites


def _plan(run_name: str = "threshold"):
    from curtail.config import load_experiment
    from curtail.planning.plan import load_experiment_traces, plan_run

    config = load_experiment(ROOT / "experiments/paper.toml")
    traces, forecasts = load_experiment_traces(config)
    return plan_run(config, config.run(run_name), traces, forecasts)


def test_simulated_run_resumed_from_a_snapshot_ends_identically():
    from curtail.planning.simulator import Simulator

    snapshots = []

    class Recording(Simulator):
        def at_safe_point(self, t_s, next_decision_s, current):
            snapshots.append(json.loads(json.dumps(self.snapshot(t_s, next_decision_s))))
            return False

    plan = _plan()
    full = Recording(plan.context, plan.policy).run()
    assert len(snapshots) > 10
    for snapshot in (snapshots[1], snapshots[len(snapshots) // 2], snapshots[-2]):
        fresh = _plan()
        resumed = Simulator(fresh.context, fresh.policy).run(resume_from=snapshot)
        assert resumed.intervals == full.intervals
        assert resumed.modes == full.modes
        assert resumed.tokens_by_site == full.tokens_by_site
        assert [e for e in resumed.events if e.event != "resume"] == list(full.events)


def test_lost_time_resumes_at_now_and_replays_identically():
    """A live run down from its checkpoint to "now": resumed from the snapshot with the lost
    stretch, it equals a run told of the stretch from the start (what a replay does); nothing
    trains and every site is off in the stretch, and the policy picks up again after it."""
    from curtail.planning.simulator import Simulator

    snapshots = []

    class Recording(Simulator):
        def at_safe_point(self, t_s, next_decision_s, current):
            if current is not None and len(current.members) >= 2:  # mid federated round: a site trains
                snapshots.append(json.loads(json.dumps(self.snapshot(t_s, next_decision_s))))
            return False

    plan = _plan()
    full = Recording(plan.context, plan.policy).run()
    snapshot = snapshots[len(snapshots) // 3]
    lost = (snapshot["t_s"], snapshot["t_s"] + 5400.0)
    fresh = _plan()
    resumed = Simulator(fresh.context, fresh.policy).run(resume_from=snapshot, lost_time=[lost])
    fresh = _plan()
    replayed = Simulator(fresh.context, fresh.policy).run(lost_time=[lost])
    assert [e for e in resumed.events if e.event != "resume"] == list(replayed.events)
    assert resumed.intervals == replayed.intervals and resumed.tokens_by_site == replayed.tokens_by_site
    [event] = [e for e in resumed.events if e.event == "lost_time"]
    assert (event.t_s, event.details["lost_s"]) == (lost[0], 5400.0)
    assert not any(i.start_s < lost[1] and i.end_s > lost[0] and i.state != "off" for i in resumed.intervals)
    assert any(i.start_s >= lost[1] and i.state == "training" for i in resumed.intervals)
    assert resumed.tokens < full.tokens or resumed.finish_s > full.finish_s  # the stretch cost training


def test_checkpoint_round_trip_and_torn_checkpoints(tmp_path):
    from curtail.errors import CheckpointError
    from curtail.runtime.checkpoint import (
        KEEP,
        latest_checkpoint,
        read_checkpoint,
        write_checkpoint,
    )

    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    state = {"version": 3, "num_outer_steps": 2, "params": params,
             "optimizer": {"name": "nesterov", "lr": 0.7, "momentum": 0.9, "momentum_buffers": {"w": params["w"] * 2}}}
    for sequence in range(1, KEEP + 2):
        write_checkpoint(tmp_path, sequence, averager_state=state, ledger_state={"format": 1},
                         executor_state={"t_s": float(sequence)}, coordinator_state={})
    latest = latest_checkpoint(tmp_path)
    assert latest.name == f"{KEEP + 1:06d}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == [
        f"{sequence:06d}" for sequence in range(2, KEEP + 2)]
    loaded = read_checkpoint(latest)
    np.testing.assert_array_equal(loaded.params["w"], params["w"])
    np.testing.assert_array_equal(loaded.outer_optimizer_state()["momentum_buffers"]["w"], params["w"] * 2)
    assert "momentum_buffers" not in loaded.optimizer  # the JSON part; the buffers stay in their file
    assert loaded.executor == {"t_s": float(KEEP + 1)}
    (latest / "ledger.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(latest)


def test_inner_optimizer_states_move_into_their_checkpoint(tmp_path):
    from curtail.runtime.checkpoint import inner_staging_dir, read_checkpoint, write_checkpoint

    state = {"version": 1, "num_outer_steps": 1, "params": {"w": np.ones(3, dtype=np.float32)},
             "optimizer": {"name": "average"}}
    stale = inner_staging_dir(tmp_path, 1)  # a crash left it before checkpoint 1 was written
    (stale / "a").mkdir(parents=True)
    staged = inner_staging_dir(tmp_path, 2)
    (staged / "a").mkdir(parents=True)
    (staged / "a" / "rank0.pt").write_bytes(b"moments")
    path = write_checkpoint(tmp_path, 2, averager_state=state, ledger_state={}, executor_state={},
                            coordinator_state={}, inner_dir=staged)
    assert (read_checkpoint(path).inner_dir / "a" / "rank0.pt").read_bytes() == b"moments"
    assert not staged.exists() and not stale.exists()
    path = write_checkpoint(tmp_path, 3, averager_state=state, ledger_state={}, executor_state={}, coordinator_state={})
    assert read_checkpoint(path).inner_dir is None  # no site was running


def test_each_averaging_actor_writes_and_reads_its_own_part_of_a_checkpoint(tmp_path):
    """Per-actor files: the parts join to the whole, the manifest covers them, damage names the file."""
    from curtail.errors import CheckpointError
    from curtail.runtime.checkpoint import (
        averager_staging_dir,
        join_averager_parts,
        read_checkpoint,
        read_tensors,
        verify_checkpoint,
        write_averager_part,
        write_checkpoint,
    )

    names = [["a", "b"], ["c"]]
    whole = {n: np.full((2, 2), i, dtype=np.float32) for i, n in enumerate("abc")}
    folder = averager_staging_dir(tmp_path, 1)
    parts = [write_averager_part(folder, {"version": 5, "num_outer_steps": 4, "params": {n: whole[n] for n in owned},
                                          "optimizer": {"name": "nesterov", "lr": 0.7,
                                                        "momentum_buffers": {n: -whole[n] for n in owned}}}, i, 2)
             for i, owned in enumerate(names)]
    joined = join_averager_parts(parts)
    assert joined["files"] == {"global": ["global-00001-of-00002.safetensors", "global-00002-of-00002.safetensors"],
                               "outer_momentum": ["outer_momentum-00001-of-00002.safetensors",
                                                  "outer_momentum-00002-of-00002.safetensors"]}
    path = write_checkpoint(tmp_path, 1, averager_state=joined, averager_dir=folder, ledger_state={},
                            executor_state={}, coordinator_state={})
    assert not folder.exists() and not (path / "global.safetensors").exists()
    assert verify_checkpoint(path) == []
    loaded = read_checkpoint(path)
    assert [loaded.part_names(i) for i in range(2)] == [{"a", "b"}, {"c"}]
    assert {n: v.tolist() for n, v in loaded.params.items()} == {n: v.tolist() for n, v in whole.items()}
    assert loaded.outer_optimizer_state()["momentum_buffers"]["c"].tolist() == (-whole["c"]).tolist()
    assert read_tensors(path / loaded.parts[1][1])["c"].tolist() == (-whole["c"]).tolist()
    with pytest.raises(CheckpointError, match="different versions"):
        join_averager_parts([parts[0], {**parts[1], "version": 6}])
    damaged = path / "outer_momentum-00002-of-00002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])
    assert verify_checkpoint(path)[0].startswith("outer_momentum-00002-of-00002.safetensors is truncated")
    with pytest.raises(CheckpointError, match="outer_momentum-00002-of-00002.safetensors is unreadable"):
        read_checkpoint(path)


def test_journal_says_exactly_what_a_resume_trains_again(tmp_path):
    from curtail.runtime.checkpoint import LedgerJournal, audit_journal, lost_since, read_journal
    from curtail.training.ledger import DataLedger

    ledger = DataLedger(total_tokens=200, block_tokens=10)
    journal = LedgerJournal(tmp_path)

    def train(site: str, tokens: int, deliver: bool = True):
        token_range = ledger.claim(site, tokens)
        journal.append("trained", site, [[0, token_range.start, token_range.end]], t_s=float(journal.seq))
        if deliver:
            ledger.complete(site, token_range, tokens)
            journal.append("delivered", site, [[0, token_range.start, token_range.end]])
        return token_range

    train("a", 30)
    mark, saved = journal.seq, ledger.to_dict()  # a checkpoint: [0, 30) is safe
    train("a", 20)  # [30, 50) delivered after the checkpoint
    train("b", 20, deliver=False)  # [50, 70): b dies, its claim goes back
    ledger.record_retrained("site_failure:b", [(0, 50, 70)])
    journal.append("released", "b", [[0, 50, 70]])
    ledger.release("b")
    train("a", 30, deliver=False)  # [50, 80) in flight when the coordinator dies
    with open(journal.path, "a") as torn:
        torn.write('{"seq": 99, "kind": "trai')  # the crash tore the last line
    lost = lost_since(read_journal(journal.path), mark)
    assert lost["ranges"] == [[0, 30, 80]] and lost["tokens"] == 50 and lost["delivered_tokens"] == 20
    assert lost["site_failures"] == [["b", 0, 50, 70]]
    # resume: the checkpoint's ledger, the lost work recorded (b's too: the checkpoint predates it)
    ledger = DataLedger.from_dict(saved)
    ledger.record_retrained("site_failure:b", [tuple(r[1:]) for r in lost["site_failures"]])
    ledger.record_retrained("resume:000001", [tuple(r) for r in lost["ranges"]])
    journal = LedgerJournal(tmp_path)
    journal.append("resume", "")
    # a second resume from the same checkpoint loses this ledger too: the same work counts again
    assert lost_since(read_journal(journal.path), mark)["ranges"] == [[0, 30, 80]]
    train("a", 50)
    (tmp_path / "ledger.json").write_text(json.dumps(ledger.to_dict()))
    audit = audit_journal(tmp_path)
    assert audit["mismatched_tokens"] == 0
    assert audit["journal_trained_tokens"] == 30 + 20 + 20 + 30 + 50
    assert audit["retrained_tokens"] == 20 + 50  # b's loss, then the crash's
    train("a", 10)  # trained but not in the ledger file: the audit sees it
    assert audit_journal(tmp_path)["mismatched_tokens"] == 10


def _kill_in_turn(victims: list[tuple[str, float]]):
    """Kill each ``(process, after_tokens)`` in turn, mid-round (in FEDERATED mode)."""
    killed: list[dict] = []

    def callback(progress: dict) -> None:
        if len(killed) == len(victims):
            return
        what, after_tokens = victims[len(killed)]
        pid = progress.get(f"{what}_pid")
        if pid and progress.get("tokens", 0) > after_tokens and progress.get("mode") == "FEDERATED":
            os.kill(pid, signal.SIGKILL)
            killed.append({"what": what, "pid": pid, "tokens": progress["tokens"]})

    return callback, killed


def _mid_round(experiment: dict) -> dict:
    """Progress (so the kill) every 240 s of the run's clock: the crash lands mid-round."""
    return {**experiment, "training": {**experiment["training"], "checkpoint_interval_s": 240}}


def _assert_retrained_is_journaled(result) -> None:
    """The work after the last checkpoint, lost with each crash, is recorded exactly (ledger,
    event, summary), is at most two rounds (with overlapped syncs a crash while a round is in
    flight loses that round and what was trained since its sync), and was trained again: every position
    the journal says was trained is in the final ledger once, plus once per recorded re-training."""
    from curtail.runtime.checkpoint import audit_journal

    summary = result.summary
    events = list(result.record.events.query("event == 'retrained'").details.map(json.loads))
    assert len(events) == len(summary["resumes"]) >= 1
    for resume, event in zip(summary["resumes"], events):
        crash = [r for r in summary["ledger_retrained"] if r[0] == f"resume:{resume['checkpoint']}"]
        assert sum(end - start for _, _, start, end in crash) == resume["tokens"] <= 2 * ROUND_TOKENS, resume
        assert resume["virtual_s_lost"] <= 2 * (600 + 5) and resume["wall_s_lost"] > 0, resume
        assert event["ranges"] == [[epoch, start, end] for _, epoch, start, end in crash]
    assert audit_journal(result.run_dir)["mismatched_tokens"] == 0


def _assert_inner_optimizers_restored(result, baseline) -> None:
    """The checkpoint carried both sites' inner AdamW and the resumed sites took it: the run
    continues as if uninterrupted (same data, same weights, same moments)."""
    events = list(result.record.events.query("event == 'inner_optimizer_restored'").details.map(json.loads))
    assert len(events) == len(result.summary["resumes"])
    assert all(event["sites"] == ["a", "b"] for event in events)  # both were training (FEDERATED) at each crash
    timings = result.record.timings
    assert sorted(timings[timings.kind == "load_optimizer"].site) == sorted(["a", "b"] * len(events))
    assert (timings.kind == "save_optimizer").sum() >= 2 * len(result.summary["weight_digests"]) // 2
    print("resumed vs uninterrupted held-out loss:", result.summary["final_eval_loss"],
          baseline.summary["final_eval_loss"])


def _assert_consistent(result, baseline) -> None:
    summary = result.summary
    assert summary["tokens"] == summary["ledger_trained_tokens"]
    assert summary["ledger_trained_by_site"] == {k: int(v) for k, v in summary["tokens_by_site"].items()}
    assert summary["tokens"] == pytest.approx(baseline.summary["tokens"], rel=0.02)
    assert abs(summary["final_eval_loss"] - baseline.summary["final_eval_loss"]) < 0.15
    assert all(len(entry["digests"]) == 1 for entry in summary["weight_digests"])


@pytest.mark.slow
def test_run_resumes_by_itself_when_the_coordinator_then_the_averager_dies(ray_cluster, two_runs, tmp_path):
    import curtail

    callback, killed = _kill_in_turn([("coordinator", 5000), ("averager", 9000)])
    experiment = _mid_round(tiny_experiment(tmp_path))  # int4 with error feedback, overlapped syncs
    experiment["training"] = {**experiment["training"], "transfer_dtype": "int4", "averager_resource": "averager",
                              "sync_fragments": 2}  # two staggered fragments, an actor each; one is killed
    experiment["execution"] = {**experiment["execution"], "overlap_sync": True}
    result = curtail.run(experiment, output_dir=tmp_path / "runs", on_progress=callback, progress_interval_s=0.3)
    assert [k["what"] for k in killed] == ["coordinator", "averager"], f"killed only {killed}"
    shards = result.summary["averager_shards"]
    names = [name for group in shards for name in group]
    assert len(shards) == 2 and all(shards) and len(set(names)) == len(names) and "lm_head.weight" in names
    assert len(result.summary["averager_nodes"]) == 2  # each asked for its unit of "averager", also when restarted
    assert result.summary["link"]["sync_fragments"] == 2
    assert len(result.summary["restarts"]) == 2
    assert (result.run_dir / "checkpoints" / "LATEST").is_file()
    assert list(result.record.events.event).count("resume") == 2
    _assert_consistent(result, two_runs[0])
    _assert_retrained_is_journaled(result)
    _assert_inner_optimizers_restored(result, two_runs[0])
