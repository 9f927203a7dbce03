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
