"""The averaging actor on the session's Ray cluster: token-weighted rounds and withdrawals.

A site that dies after its pseudo-gradient reached the averager but before the coordinator
heard back has its token ranges returned to the ledger (they are trained again); its update
must then be withdrawn, or those tokens would enter the model twice.
"""

from __future__ import annotations

import numpy as np
import pytest

from curtail.training.compression import compress


@pytest.fixture
def averager(ray_cluster):
    import ray

    from curtail.runtime.averager import Averager

    actor = Averager.remote({"w": np.zeros(4, dtype=np.float32)}, "average", 0.7, 0.9)
    yield actor
    ray.kill(actor)


def _grad(value: float):
    return compress({"w": np.full(4, value, dtype=np.float32)}, "fp32")


def test_outer_step_is_the_token_weighted_mean(averager):
    import ray

    ray.get([averager.submit.remote("a", 1, _grad(1.0), 300), averager.submit.remote("b", 1, _grad(5.0), 100)])
    outcome = ray.get(averager.outer_step.remote(1))
    assert outcome["sites"] == ["a", "b"] and outcome["version"] == 1
    _, params = ray.get(averager.get_global.remote())
    np.testing.assert_allclose(params["w"], -(0.75 * 1.0 + 0.25 * 5.0))  # global − weighted mean


def test_a_withdrawn_update_does_not_count(averager):
    import ray

    ray.get([averager.submit.remote("a", 2, _grad(1.0), 300), averager.submit.remote("b", 2, _grad(5.0), 100)])
    assert ray.get(averager.withdraw.remote(2, ["b", "c"])) == ["b"]  # c never submitted
    outcome = ray.get(averager.outer_step.remote(2))
    assert outcome["sites"] == ["a"] and outcome["tokens"] == {"a": 300.0}
    _, params = ray.get(averager.get_global.remote())
    np.testing.assert_allclose(params["w"], -1.0)


def test_an_overlapped_round_steps_when_the_last_expected_submission_arrives(averager):
    import ray

    ray.get(averager.expect.remote(3, ["a", "b"]))
    ray.get(averager.submit.remote("a", 3, _grad(1.0), 300))
    status = ray.get(averager.round_status.remote(3))
    assert status == {"outcome": None, "arrived": ["a"], "expected": ["a", "b"]}  # b still in flight
    ray.get(averager.submit.remote("b", 3, _grad(5.0), 100))
    outcome = ray.get(averager.round_status.remote(3))["outcome"]
    assert outcome["sites"] == ["a", "b"] and outcome["version"] == 1
    np.testing.assert_allclose(ray.get(averager.get_global.remote())[1]["w"], -2.0)


def test_withdrawing_a_dead_site_lands_an_overlapped_round_on_the_others(averager):
    import ray

    ray.get(averager.expect.remote(4, ["a", "b", "c"]))
    ray.get([averager.submit.remote("a", 4, _grad(1.0), 300), averager.submit.remote("b", 4, _grad(5.0), 100)])
    assert ray.get(averager.round_status.remote(4))["outcome"] is None
    assert ray.get(averager.withdraw.remote(4, ["b", "c"])) == ["b"]  # b arrived, died; c never arrived
    outcome = ray.get(averager.round_status.remote(4))["outcome"]
    assert outcome["sites"] == ["a"] and outcome["tokens"] == {"a": 300.0}
    np.testing.assert_allclose(ray.get(averager.get_global.remote())[1]["w"], -1.0)


def test_a_compressed_broadcast_keeps_every_site_on_the_same_view_near_the_weights(ray_cluster):
    """int4 broadcast: a site holding the previous view downloads only the packed change, adds it
    and holds the actor's view bit for bit; the view stays within a packing step of the exact
    weights (what a packing loses goes out with the next change); a publish resets it."""
    import ray

    from curtail.runtime.averager import Averager, advance_view
    from curtail.training.compression import WireFormat

    rng = np.random.default_rng(0)
    initial = {"w": rng.standard_normal(4096).astype(np.float32)}
    actor = Averager.remote(initial, "nesterov", 0.7, 0.9, WireFormat("int4", block_size=64))
    try:
        kind, version, view = ray.get(actor.get_view.remote(-1))
        assert (kind, version) == ("full", 0)
        held = {"w": np.array(view["w"])}
        np.testing.assert_array_equal(held["w"], initial["w"])
        for round_index in range(1, 9):
            update = {"w": (rng.standard_normal(4096) * 1e-2).astype(np.float32)}
            ray.get(actor.submit.remote("a", round_index, compress(update, "fp32"), 100))
            ray.get(actor.outer_step.remote(round_index))
            kind, version, change = ray.get(actor.get_view.remote(version))
            assert kind == "change" and version == round_index
            assert change.num_bytes < 4096 * 4 / 6  # int4 codes and scales, not fp32 weights
            _, weights = ray.get(actor.get_global.remote())
            gap = np.abs(weights["w"] - held["w"]).max()  # what the change had to carry
            advance_view(held, change)
            _, _, exact_view = ray.get(actor.get_view.remote(-1))  # a site without a view: the whole of it
            np.testing.assert_array_equal(held["w"], exact_view["w"])
            # int4 rounds to half a step of a block's largest value over 7: within 1/14 of the gap
            assert np.abs(weights["w"] - held["w"]).max() <= gap / 14 * (1 + 1e-5)
        ray.get(actor.publish.remote("a", {"w": np.ones(4096, dtype=np.float32)}))
        kind, _, view = ray.get(actor.get_view.remote(version))
        assert kind == "full" and np.all(view["w"] == 1.0)
    finally:
        ray.kill(actor)


def test_parameters_split_into_shards_of_about_equal_size():
    from curtail.runtime.averager import shard_names

    sizes = {"embed": 1000, "a": 300, "b": 300, "c": 250, "d": 100, "head": 1000}
    names = shard_names(sizes, 3)
    assert sorted(n for group in names for n in group) == sorted(sizes)  # each name once
    loads = [sum(sizes[n] for n in group) for group in names]
    assert max(loads) - min(loads) <= 300
    assert all(list(group) == [n for n in sizes if n in group] for group in names)  # the model's order
    with pytest.raises(ValueError, match="averager_shards must be between 1 and the model's 6 parameter tensors"):
        shard_names(sizes, 7)


def test_more_averager_shards_than_tensors_is_found_before_ray(tmp_path):
    from curtail.config import parse_experiment
    from curtail.errors import PreflightError
    from curtail.preflight import check_run_files
    from curtail.training.model import build_model, get_spec

    for preset in ("tiny", "small"):
        spec = get_spec(preset)
        assert spec.num_parameter_tensors == len(list(build_model(spec, 512, 0).named_parameters()))
    experiment = parse_experiment({
        "name": "x", "token_budget": 1000, "traces": [{"path": "t.csv"}],
        "sites": {"a": {"region": "A", "training_power_w": 1, "idle_power_w": 1, "tokens_per_s": 1}},
        "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": ["a"]}],
        "training": {"preset": "tiny", "averager_shards": 99, "cache_dir": str(tmp_path)}})
    with pytest.raises(PreflightError, match=r"training.averager_shards = 99: the tiny model has 21 parameter "
                                             r"tensors to share out; use at most 21"):
        check_run_files(experiment)


def test_a_sharded_averager_equals_the_single_actor_bit_for_bit(ray_cluster, tmp_path):
    """Three actors holding a third of tiny's parameters each, against one actor: blocking and
    overlapped rounds of int4 top-k pseudo-gradients, a withdrawal, a hand-off, a compressed
    broadcast, the checkpoint (each actor writes its own files) and resumes from it — every
    array equal bit for bit."""
    import ray

    from curtail.runtime.averager import Averager, AveragerClient, AveragerShards, shard_names
    from curtail.runtime.checkpoint import averager_staging_dir, read_checkpoint, write_checkpoint
    from curtail.training.compression import WireFormat
    from curtail.training.model import build_model, get_spec

    initial = {n: p.detach().numpy().copy() for n, p in build_model(get_spec("tiny"), 512, 0).named_parameters()}
    broadcast, wire = WireFormat("int4"), WireFormat("int4", topk_fraction=0.1)

    def start(params):
        return Averager.remote(params, "nesterov", 0.7, 0.9, broadcast)

    names = shard_names({n: v.size for n, v in initial.items()}, 3)
    single = AveragerClient(start(initial))
    sharded = AveragerClient(AveragerShards(tuple(start({n: initial[n] for n in g}) for g in names), names))
    rng = np.random.default_rng(0)

    def grad():
        return compress({n: rng.normal(0, 1e-3, v.shape).astype(np.float32) for n, v in initial.items()}, wire)

    def same(a, b):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    for client in (single, sharded):
        rng = np.random.default_rng(0)
        client.submit("a", 1, grad(), 300)
        client.submit("b", 1, grad(), 100)
        assert client.outer_step(1)["version"] == 1
        client.expect(2, ["a", "b", "c"])  # overlapped: steps when the last expected one arrives
        client.submit("a", 2, grad(), 200)
        client.submit("c", 2, grad(), 50)
        assert client.round_status(2)["outcome"] is None and client.round_status(2)["arrived"] == ["a", "c"]
        assert client.withdraw(2, ["c"]) == ["c"]  # c died: its update leaves, the round waits for b
        client.submit("b", 2, grad(), 100)
        assert client.round_status(2)["outcome"]["sites"] == ["a", "b"]
    state, state_sharded = single.state(), sharded.state()
    assert state["version"] == state_sharded["version"] == 2
    same(state["params"], state_sharded["params"])
    same(state["optimizer"]["momentum_buffers"], state_sharded["optimizer"]["momentum_buffers"])
    for held in (1, 0):  # the packed view change (a site holding version 1), and the full view
        kind, version, view = single.get_view(held)
        kind_s, version_s, view_s = sharded.get_view(held)
        assert (kind, version) == (kind_s, version_s) == (("change", 2) if held == 1 else ("full", 2))
        if kind == "change":
            same(view.arrays, view_s.arrays) and same(view.scales, view_s.scales)
        else:
            same(view, view_s)
    snapshot = ray.get(sharded.global_snapshot())
    assert snapshot[0] == 2 and snapshot[1].keys() == initial.keys()
    assert sharded.publish("a", state["params"]) == single.publish("a", state["params"]) == 3
    assert sharded.published_by("a") == 3 and sharded.published_by("b") is None
    # checkpoints: each actor writes its own part; resumes into three fresh actors (each reads its
    # own file), into one actor (the parts joined) and from the single actor's file into shards
    state = single.state()
    checkpoints = {}
    for label, client in (("single", single), ("sharded", sharded)):
        folder = averager_staging_dir(tmp_path / label, 1)
        checkpoints[label] = read_checkpoint(write_checkpoint(
            tmp_path / label, 1, averager_state=client.save_later(str(folder))(), averager_dir=folder,
            ledger_state={}, executor_state={}, coordinator_state={}))
    assert len(checkpoints["single"].parts) == 1 and len(checkpoints["sharded"].parts) == 3
    assert [checkpoints["sharded"].part_names(i) for i in range(3)] == [set(g) for g in names]
    resumed = []
    for label, into in (("sharded", 3), ("sharded", 1), ("single", 3)):
        fresh = AveragerClient(start(initial) if into == 1 else AveragerShards(
            tuple(start({n: initial[n] for n in g}) for g in names), names))
        assert fresh.load_checkpoint(checkpoints[label], str) == 3
        resumed.append(fresh)
        restored = fresh.state()
        assert restored["version"] == 3 and restored["num_outer_steps"] == state["num_outer_steps"]
        same(restored["params"], state["params"])
        same(restored["optimizer"]["momentum_buffers"], state["optimizer"]["momentum_buffers"])
    for client in (single, sharded, *resumed):
        for handle in client.handles:
            ray.kill(handle)


def test_staggered_fragments_land_when_every_actor_stepped_and_deliver_only_the_members_in_all(ray_cluster):
    """Fragments of one round submitted at different times, each to its own actor (``parts()``):
    the round has no outcome until the last fragment's actor stepped; a member that died after
    its first fragment stepped is withdrawn from the rest and its work is not delivered."""
    import ray

    from curtail.runtime.averager import Averager, AveragerClient, AveragerShards

    names = (("w",), ("v",))
    actors = tuple(Averager.remote({name: np.zeros(4, dtype=np.float32)}, "average", 0.7, 0.9) for (name,) in names)
    client = AveragerClient(AveragerShards(actors, names))
    (first_names, first), (second_names, second) = client.parts()
    assert (first_names, second_names) == names and first.handles == actors[:1]
    try:
        client.expect(1, ["a", "b"])
        for site, value in (("a", 1.0), ("b", 3.0)):  # fragment 0 leaves at the sync
            first.submit(site, 1, compress({"w": np.full(4, value, dtype=np.float32)}, "fp32"), 100)
        status = client.round_status(1)
        assert status["outcome"] is None and status["expected"] == ["a", "b"] and status["arrived"] == []
        second.submit("a", 1, compress({"v": np.full(4, 2.0, dtype=np.float32)}, "fp32"), 100)
        assert client.withdraw(1, ["b"]) == []  # b died before its fragment 1 left
        outcome = client.round_status(1)["outcome"]
        assert outcome == {"version": 1, "sites": ["a"], "tokens": {"a": 100.0}}
        version, params = client.get_global()
        assert version == 1 and np.all(params["w"] == -2.0) and np.all(params["v"] == -2.0)
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.mark.parametrize("reset", [True, False])
def test_a_handoff_resets_the_outer_momentum_only_when_asked(ray_cluster, reset):
    """A single site's publish replaces the global weights; with ``outer_momentum_at_handoff =
    "reset"`` the next federated phase's first outer step is a first step again, lr·(1 + μ)·g,
    not one that also pushes along the phase before's momentum."""
    import ray

    from curtail.runtime.averager import Averager

    lr, mu = 0.5, 0.75
    actor = Averager.remote({"w": np.zeros(4, dtype=np.float32)}, "nesterov", lr, mu,
                            reset_momentum_at_handoff=reset)
    ray.get([actor.submit.remote("a", 1, _grad(1.0), 100), actor.submit.remote("b", 1, _grad(1.0), 100)])
    ray.get(actor.outer_step.remote(1))  # v = 1
    ray.get(actor.publish.remote("a", {"w": np.full(4, 10.0, dtype=np.float32)}))
    ray.get([actor.submit.remote("a", 2, _grad(1.0), 100), actor.submit.remote("b", 2, _grad(1.0), 100)])
    ray.get(actor.outer_step.remote(2))
    stale = 0.0 if reset else 1.0  # v before the step: 0 after a reset, else the first phase's g
    v = mu * stale + 1.0
    np.testing.assert_allclose(ray.get(actor.get_global.remote())[1]["w"], 10.0 - lr * (1.0 + mu * v), rtol=1e-6)
    ray.kill(actor)
