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
