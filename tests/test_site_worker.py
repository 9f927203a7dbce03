"""The site worker's commands in one process, no Ray: one rank (world size 1) on a CPU, the
tiny model on real text (bytes as tokens), and autospecced fakes of the averager client, the
mailbox channel and the drain-checkpoint reporter at the process edges."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import create_autospec

import numpy as np
import pytest
import torch

from curtail.runtime.averager import AveragerClient, shard_names
from curtail.runtime.protocol import (
    Command,
    CommandFailed,
    Flush,
    Flushed,
    Load,
    Loaded,
    LoadOptimizer,
    ModelSetup,
    OptimizerLoaded,
    OptimizerSaved,
    Publish,
    Published,
    SaveOptimizer,
    SiteLoopConfig,
    Stop,
    Stopped,
    Submit,
    Submitted,
    Train,
    Trained,
)
from curtail.runtime.sites import MailboxChannel, SiteWorker, site_trainer
from curtail.training.averaging import pseudo_gradient
from curtail.training.compression import WireFormat, compress, decompress
from curtail.training.data import TokenCorpus
from curtail.training.model import tiny
from curtail.training.schedule import LRSchedule

torch.set_num_threads(1)

TEXT = Path(__file__).resolve().parents[1] / "data" / "text" / "tinyshakespeare.txt"
BATCH_SIZE, SEQ_LEN = 4, 64
STEP_TOKENS = BATCH_SIZE * SEQ_LEN
SCHEDULE = LRSchedule(peak_lr=3e-3, total_tokens=1_000_000, warmup_tokens=2_000)


@pytest.fixture(scope="module")
def corpus() -> TokenCorpus:
    """Real text, one token per byte (vocabulary 256): loss falls within tens of steps."""
    data = TEXT.read_bytes()[:200_000]
    return TokenCorpus(np.frombuffer(data, dtype=np.uint8).astype(np.uint16), "train")


def make_config(transfer_dtype: str = "bf16") -> SiteLoopConfig:
    return SiteLoopConfig(
        site="a", model=ModelSetup(spec=tiny(), vocab_size=256, seed=7, seq_len=SEQ_LEN),
        mailbox=None, averager=None, train_tokens=None, batch_size=BATCH_SIZE,
        schedule=SCHEDULE, wire=WireFormat(transfer_dtype), use_gpu=False,
    )


def global_weights() -> dict[str, np.ndarray]:
    """What the averager hands out: the seed's initial weights, read-only like object-store arrays."""
    params = site_trainer(make_config(), torch.device("cpu")).export_params()
    for array in params.values():
        array.flags.writeable = False
    return params


@pytest.fixture
def averager():
    fake = create_autospec(AveragerClient, instance=True)
    fake.get_global.return_value = (3, global_weights())
    fake.get_view.return_value = ("full", 3, fake.get_global.return_value[1])  # the exact weights (fp32 broadcast)
    fake.submit.return_value = 1
    fake.publish.return_value = 4
    return fake


def make_worker(corpus: TokenCorpus, averager, transfer_dtype: str = "bf16", **kwargs) -> SiteWorker:
    config = make_config(transfer_dtype)
    return SiteWorker(config, site_trainer(config, torch.device("cpu")), corpus, averager, node_id="node-a", **kwargs)


def train_command(first_step: int, num_steps: int, **kwargs) -> Train:
    defaults = {"tokens_before": float(first_step * STEP_TOKENS), "concurrency": 1.0}
    return Train(chunks=((first_step * STEP_TOKENS, num_steps),), **{**defaults, **kwargs})


def fake_channel(*commands: object):
    channel = create_autospec(MailboxChannel, instance=True)
    channel.next_command.side_effect = list(commands)
    return channel


def replies(channel) -> list:
    return [call.args[0] for call in channel.reply.call_args_list]


# ------------------------------------------------------------------------------------- dispatch


def test_every_command_has_a_handler(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    assert set(worker.handlers) == set(Command.__subclasses__())


def test_serve_answers_each_command_until_stop(corpus, averager) -> None:
    saved = {}

    def report_checkpoint(metrics, folder):
        saved["metrics"] = metrics
        saved["state"] = torch.load(Path(folder) / "inner_optimizer_rank0.pt", weights_only=True)

    worker = make_worker(corpus, averager, report_checkpoint=report_checkpoint)
    channel = fake_channel(Load(), train_command(0, 3), Stop())
    assert worker.serve(channel) == 3
    loaded, trained, stopped = replies(channel)
    assert isinstance(loaded, Loaded) and isinstance(trained, Trained) and isinstance(stopped, Stopped)
    assert stopped.steps == 3 and saved["metrics"] == {"steps": 3}
    assert saved["state"]["num_steps"] == 3  # the drain checkpoint holds the trained AdamW
    assert all(reply.wall_s >= 0 for reply in (loaded, trained, stopped))


@dataclass(frozen=True)
class Evaluate:  # a command nothing handles any more (not a Command subclass: the table test stays exact)
    kind = "eval"


def test_unknown_command_is_answered_with_command_failed_then_raised(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    channel = fake_channel(Evaluate())
    with pytest.raises(ValueError, match="unknown site command"):
        worker.serve(channel)
    (failed,) = replies(channel)
    assert isinstance(failed, CommandFailed) and failed.command == "eval"
    assert "unknown site command" in failed.error and failed.wall_s >= 0


def test_failing_command_is_answered_with_its_traceback(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    channel = fake_channel(Submit(round_index=0, tokens=1.0))  # no Load first: no reference weights
    with pytest.raises(RuntimeError, match="submit before load"):
        worker.serve(channel)
    (failed,) = replies(channel)
    assert isinstance(failed, CommandFailed) and failed.command == "submit"
    assert "Traceback" in failed.error and "submit before load" in failed.error
    averager.submit.assert_not_called()


# ----------------------------------------------------------------------------------------- train


def test_train_trains_the_given_chunks_at_the_run_schedule(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    chunks = ((0, 2), (100 * STEP_TOKENS, 3))
    trained = worker.execute(Train(chunks=chunks, tokens_before=5_000.0, concurrency=2.0))
    assert isinstance(trained, Trained)
    assert (trained.steps, trained.tokens, worker.steps_done) == (5, 5 * STEP_TOKENS, 5)
    assert math.isfinite(trained.loss) and trained.power_w is None and trained.gpus == 1

    # the same steps by hand: each chunk's batches in order; the LR advances `concurrency` times faster
    twin = site_trainer(make_config(), torch.device("cpu"))
    twin.load_global(averager.get_global.return_value[1])
    losses = []
    for offset, position in enumerate([0, STEP_TOKENS, *(100 * STEP_TOKENS + k * STEP_TOKENS for k in range(3))]):
        lr = SCHEDULE.lr_at(5_000.0 + offset * STEP_TOKENS * 2.0)
        losses.append(twin.train_step(*corpus.batch(position, BATCH_SIZE, SEQ_LEN), lr))
    assert worker.trainer.weights_fingerprint() == twin.weights_fingerprint()
    assert trained.loss == pytest.approx(np.mean(losses), rel=1e-6)


def test_loss_falls_over_repeated_train_commands(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    losses = [worker.execute(train_command(10 * k, 10)).loss for k in range(6)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert worker.trainer.tokens_trained == 60 * STEP_TOKENS


def test_a_train_command_asked_to_report_reports_the_site_progress_to_ray_train(corpus, averager) -> None:
    reported, saved = [], {}
    worker = make_worker(corpus, averager, report_metrics=reported.append,
                         report_checkpoint=lambda metrics, folder: saved.update(metrics))
    worker.execute(Load())
    worker.execute(Train(chunks=((0, 2),), tokens_before=1_000.0, concurrency=2.0))  # not asked: silent
    assert reported == []
    trained = worker.execute(Train(chunks=((10 * STEP_TOKENS, 3),), tokens_before=9_000.0, concurrency=2.0,
                                   report=True))
    [metrics] = reported
    run_tokens = 9_000.0 + 3 * STEP_TOKENS * 2.0
    assert metrics == {"site": "a", "window_steps": 5, "window_tokens": 5 * STEP_TOKENS, "run_tokens": run_tokens,
                       "loss": trained.loss, "lr": SCHEDULE.lr_at(run_tokens)}  # no power_w on a CPU
    worker.execute(Stop())
    assert saved == {**metrics, "steps": 5}  # the drain's report carries them: Ray Train's Result shows them


def test_train_stops_at_the_wall_clock_deadline(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    trained = worker.execute(train_command(0, 5, until_wall=time.time() - 1.0))
    assert (trained.steps, trained.tokens, worker.steps_done) == (0, 0, 0)
    assert math.isnan(trained.loss)


# ------------------------------------------------------------------------------ weights in/out


def test_load_takes_the_global_weights(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    worker.execute(train_command(0, 2))  # drift away from the global weights first
    loaded = worker.execute(Load())
    assert isinstance(loaded, Loaded)
    assert (loaded.version, loaded.node_ids, loaded.pid) == (3, ("node-a",), os.getpid())
    expected = site_trainer(make_config(), torch.device("cpu"))
    assert loaded.digest == worker.trainer.weights_fingerprint() == expected.weights_fingerprint()


def test_the_first_load_carries_the_groups_start_up_and_only_the_first(corpus, averager) -> None:
    phases = {"ray_train": 12.5, "corpus": 0.1, "model": 3.0, "optimizer": 0.0}
    worker = make_worker(corpus, averager, startup_s=phases)
    assert worker.execute(Load()).startup_s == tuple(phases.items())
    assert worker.execute(Load()).startup_s == ()


@pytest.mark.parametrize("transfer_dtype", ["bf16", "fp32"])
def test_submit_sends_reference_minus_local_in_the_transfer_dtype(corpus, averager, transfer_dtype) -> None:
    worker = make_worker(corpus, averager, transfer_dtype)
    worker.execute(Load())
    worker.execute(train_command(0, 3))
    submitted = worker.execute(Submit(round_index=2, tokens=3.0 * STEP_TOKENS))
    assert isinstance(submitted, Submitted)
    (site, round_index, packed, tokens), _ = averager.submit.call_args
    assert (site, round_index, tokens) == ("a", 2, 3.0 * STEP_TOKENS)
    assert packed.dtype == transfer_dtype and submitted.num_bytes == packed.num_bytes
    expected = compress(pseudo_gradient(averager.get_global.return_value[1], worker.trainer.export_params()),
                        transfer_dtype)
    assert packed.num_bytes == expected.num_bytes
    for name, array in decompress(expected).items():
        np.testing.assert_array_equal(decompress(packed)[name], array)
    assert any(np.abs(array).max() > 0 for array in decompress(packed).values())


def test_publish_hands_out_the_current_weights(corpus, averager) -> None:
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    worker.execute(train_command(0, 2))
    published = worker.execute(Publish())
    assert isinstance(published, Published) and published.version == 4
    (site, params), _ = averager.publish.call_args
    assert site == "a"
    for name, array in worker.trainer.export_params().items():
        np.testing.assert_array_equal(params[name], array)
    # the published weights are the new reference: nothing trained since, nothing to submit
    worker.execute(Submit(round_index=0, tokens=0.0))
    (_, _, packed, _), _ = averager.submit.call_args
    assert all(not array.any() for array in decompress(packed).values())


# ------------------------------------------------------------------------------- overlapped sync


@pytest.fixture
def merged_weights() -> dict[str, np.ndarray]:
    """What the round in flight lands as: the initial weights moved a little (version 4)."""
    return {name: (array + np.float32(0.01)).astype(np.float32) for name, array in global_weights().items()}


def overlapped_averager(averager, merged: dict[str, np.ndarray]):
    """The averager of an overlapped round: the outer step runs once ``stepped`` is set."""
    import threading

    stepped = threading.Event()
    averager.round_status.side_effect = lambda index: {"outcome": {"version": 4} if stepped.is_set() else None}
    initial = averager.get_view.return_value
    averager.get_view.side_effect = lambda held: ("full", 4, merged) if stepped.is_set() else initial
    return stepped


def in_flight(worker: SiteWorker) -> int | None:
    """The overlapped round the worker has not merged yet."""
    return worker.round.round_index if worker.round is not None else None


def wait_for_arrival(worker: SiteWorker) -> None:
    deadline = time.monotonic() + 10
    while not worker.round.flights[0].arrived():
        assert time.monotonic() < deadline, "the overlapped sync never arrived"
        time.sleep(0.01)


def test_an_overlapped_sync_that_arrives_before_any_step_is_exactly_a_load(corpus, averager, merged_weights) -> None:
    stepped = overlapped_averager(averager, merged_weights)
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    worker.execute(train_command(0, 2))
    submitted = worker.execute(Submit(round_index=1, tokens=2.0 * STEP_TOKENS, overlap=True))
    assert submitted.num_bytes == 0 and in_flight(worker) == 1  # counted when it lands (Merge.sent_bytes)
    stepped.set()
    wait_for_arrival(worker)
    trained = worker.execute(train_command(2, 1))  # merges before its first step
    assert (trained.merged.version, trained.merged.num_bytes) == (4, sum(a.nbytes for a in merged_weights.values()))
    (_, _, packed, _), _ = averager.submit.call_args
    assert trained.merged.sent_bytes == packed.num_bytes > 0
    assert in_flight(worker) is None and worker.held_version == 4

    blocking = make_worker(corpus, create_autospec(AveragerClient, instance=True))  # the same, blocking
    blocking.averager.get_view.side_effect = [("full", 3, global_weights()), ("full", 4, merged_weights)]
    blocking.execute(Load())
    blocking.execute(train_command(0, 2))
    blocking.execute(Submit(round_index=1, tokens=2.0 * STEP_TOKENS))
    blocking.execute(Load())
    blocking.execute(train_command(2, 1))
    assert worker.trainer.weights_fingerprint() == blocking.trainer.weights_fingerprint()  # bit for bit


def test_steps_taken_in_flight_are_kept_on_top_of_the_merged_weights(corpus, averager, merged_weights) -> None:
    """θ ← θ_global + (θ − θ_sent); the next pseudo-gradient is exactly the steps since the submit."""
    stepped = overlapped_averager(averager, merged_weights)
    worker = make_worker(corpus, averager, "fp32")
    worker.execute(Load())
    worker.execute(train_command(0, 2))
    worker.execute(Submit(round_index=1, tokens=2.0 * STEP_TOKENS, overlap=True))
    sent = worker.trainer.export_params()
    trained = worker.execute(train_command(2, 3))  # in flight all along
    assert trained.merged is None and in_flight(worker) == 1
    local = worker.trainer.export_params()
    stepped.set()
    worker._merge(wait=True)
    assert worker.merged is not None and worker.merged.version == 4
    for name, array in worker.trainer.export_params().items():
        np.testing.assert_array_equal(array, (local[name] - sent[name]) + merged_weights[name])
    worker.execute(Submit(round_index=2, tokens=3.0 * STEP_TOKENS))  # blocking: packs θ_global − θ
    (_, round_index, packed, _), _ = averager.submit.call_args
    assert round_index == 2
    for name, array in decompress(packed).items():
        np.testing.assert_allclose(array, sent[name] - local[name], atol=1e-6)  # the 3 steps in flight


def test_any_command_but_training_waits_for_the_sync_in_flight(corpus, averager, merged_weights) -> None:
    import threading

    stepped = overlapped_averager(averager, merged_weights)
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    worker.execute(train_command(0, 1))
    worker.execute(Submit(round_index=1, tokens=1.0 * STEP_TOKENS, overlap=True))
    threading.Timer(0.3, stepped.set).start()
    started = time.monotonic()
    published = worker.execute(Publish())
    assert time.monotonic() - started >= 0.25 and published.wall_s >= 0.25  # the wait is blocked time
    assert published.merged is not None and published.merged.version == 4
    (_, params), _ = averager.publish.call_args
    for name, array in params.items():
        np.testing.assert_array_equal(array, merged_weights[name])  # nothing trained in flight: the merged weights


def test_a_failed_transfer_fails_the_next_training_command(corpus, averager) -> None:
    averager.submit.side_effect = ConnectionError("averager unreachable")
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    worker.execute(train_command(0, 1))
    worker.execute(Submit(round_index=1, tokens=1.0 * STEP_TOKENS, overlap=True))
    wait_for_arrival(worker)
    with pytest.raises(RuntimeError, match="round 1's overlapped sync failed.*averager unreachable"):
        worker.execute(train_command(1, 1))


# ----------------------------------------------------------------------------- inner optimizer


# ----------------------------------------------------------------------------- staggered fragments


def staggered_worker(corpus: TokenCorpus, merged: dict[str, np.ndarray]):
    """A site whose overlapped syncs go as two fragments, each to its own (fake) averaging actor,
    whose round steps once its event is set."""
    import threading

    initial = global_weights()
    groups = shard_names({name: array.size for name, array in initial.items()}, 2)
    main = create_autospec(AveragerClient, instance=True)
    main.get_view.return_value = ("full", 3, initial)
    stepped, clients = [threading.Event(), threading.Event()], []
    for group, event in zip(groups, stepped, strict=True):
        client = create_autospec(AveragerClient, instance=True)
        client.round_status.side_effect = lambda _, event=event: {"outcome": {"version": 4} if event.is_set() else None}
        client.get_view.return_value = ("full", 4, {name: merged[name] for name in group})
        clients.append(client)
    main.parts.return_value = list(zip(groups, clients, strict=True))
    config = dataclasses.replace(make_config("fp32"), staggered=True)
    worker = SiteWorker(config, site_trainer(config, torch.device("cpu")), corpus, main, node_id="node-a")
    return worker, groups, clients, stepped


def submitted(client, timeout_s: float = 10.0):
    """What the fragment's transfer thread submitted: ``(pseudo-gradient, tokens)``."""
    deadline = time.monotonic() + timeout_s
    while not client.submit.called:
        assert time.monotonic() < deadline, "the fragment was never submitted"
        time.sleep(0.01)
    (_, _, packed, tokens), _ = client.submit.call_args
    return decompress(packed), tokens


def test_staggered_fragments_leave_spread_over_the_round_and_merge_each_against_its_own_send(
        corpus, merged_weights) -> None:
    """Fragment 0 leaves at the sync, fragment 1 half the last round's steps later; each carries
    θ_ref − θ of its own parameters at its own send, with the round's tokens, and each merge keeps
    the steps since that fragment left: θ[p] ← θ_global[p] + (θ[p] − θ_sent[p])."""
    worker, groups, clients, stepped = staggered_worker(corpus, merged_weights)
    initial = global_weights()
    worker.execute(Load())
    worker.execute(train_command(0, 4))
    at_sync = worker.trainer.export_params()
    worker.execute(Submit(round_index=1, tokens=4.0 * STEP_TOKENS, overlap=True))
    assert worker.round.num_sent == 1  # fragment 1 is due 4 // 2 = 2 steps on
    assert worker.execute(train_command(4, 1)).pack_s == 0
    assert worker.round.num_sent == 1 and not clients[1].submit.called
    trained = worker.execute(train_command(5, 1))
    assert worker.round.num_sent == 2 and trained.pack_s > 0  # the packing between steps is reported (not training)
    at_send = worker.trainer.export_params()
    for client, group, sent in zip(clients, groups, (at_sync, at_send), strict=True):
        grads, tokens = submitted(client)
        assert sorted(grads) == sorted(group) and tokens == 4.0 * STEP_TOKENS
        for name in group:
            np.testing.assert_array_equal(grads[name], initial[name] - sent[name])
    worker.execute(train_command(6, 1))  # nothing landed yet
    local = worker.trainer.export_params()
    assert worker.merged is None and in_flight(worker) == 1
    for event in stepped:
        event.set()
    worker._merge(wait=True)
    assert in_flight(worker) is None and worker.held_version == 4 and worker.merged.version == 4
    for group, sent in zip(groups, (at_sync, at_send), strict=True):
        for name in group:
            np.testing.assert_array_equal(worker.trainer.export_params()[name],
                                          (local[name] - sent[name]) + merged_weights[name])
    # the next pseudo-gradient of each fragment is its steps since its own send (3 and 1)
    worker.averager.submit.return_value = 1
    worker.execute(Submit(round_index=2, tokens=3.0 * STEP_TOKENS))
    (_, _, packed, _), _ = worker.averager.submit.call_args
    grads = decompress(packed)
    for group, sent in zip(groups, (at_sync, at_send), strict=True):
        for name in group:
            np.testing.assert_allclose(grads[name], sent[name] - local[name], atol=1e-6)


def test_a_flush_sends_the_fragments_not_yet_due_without_waiting(corpus, merged_weights) -> None:
    worker, _, clients, stepped = staggered_worker(corpus, merged_weights)
    worker.execute(Load())
    worker.execute(train_command(0, 8))
    worker.execute(Submit(round_index=1, tokens=8.0 * STEP_TOKENS, overlap=True))
    assert worker.round.num_sent == 1
    flushed = worker.execute(Flush())
    assert isinstance(flushed, Flushed) and flushed.merged is None
    assert worker.round.num_sent == 2 and in_flight(worker) == 1  # sent; the round has not landed
    submitted(clients[1])
    for event in stepped:
        event.set()
    loaded = worker.execute(Load())  # anything but training merges first
    assert loaded.merged.version == 4 and in_flight(worker) is None


def test_save_and_load_optimizer_round_trip_adamw_state(corpus, averager, tmp_path) -> None:
    worker = make_worker(corpus, averager)
    worker.execute(Load())
    worker.execute(train_command(0, 3))
    assert isinstance(worker.execute(SaveOptimizer(path=str(tmp_path / "a"))), OptimizerSaved)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["rank0.pt"]

    resumed = make_worker(corpus, averager)
    loaded = resumed.execute(LoadOptimizer(path=str(tmp_path / "a")))
    assert isinstance(loaded, OptimizerLoaded) and loaded.loaded
    before, after = worker.trainer.optimizer.state_dict(), resumed.trainer.optimizer.state_dict()
    assert resumed.trainer.num_steps == 3 and before["state"].keys() == after["state"].keys()
    for key, state in before["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(after["state"][key][name], state[name], rtol=0, atol=0)

    missing = make_worker(corpus, averager).execute(LoadOptimizer(path=str(tmp_path / "nowhere")))
    assert isinstance(missing, OptimizerLoaded) and not missing.loaded
