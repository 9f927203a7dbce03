"""Outer step: hand-worked two-site examples, token weighting, state, bf16 compression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curtail.training.averaging import (
    AveragingOuterOptimizer,
    NesterovOuterOptimizer,
    make_outer_optimizer,
    outer_momentum_for,
    pseudo_gradient,
    weighted_mean,
)
from curtail.training.compression import compress, decompress

torch.set_num_threads(1)  # tiny models gain nothing from more; robust when the CPU is shared


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# Round 1, worked by hand: global θ = [1, 2]; site a trained 3 tokens to [0.5, 2.5],
# site b 1 token to [1.5, 1.0].  g_a = [0.5, -0.5], g_b = [-0.5, 1.0];
# token-weighted mean g = (3·g_a + 1·g_b) / 4 = [0.25, -0.125].
GLOBAL = {"w": f32(1.0, 2.0)}
SITES = {"a": {"w": f32(0.5, 2.5)}, "b": {"w": f32(1.5, 1.0)}}
TOKENS = {"a": 3, "b": 1}


def round_one_grads() -> dict[str, dict[str, np.ndarray]]:
    return {site: pseudo_gradient(GLOBAL, params) for site, params in SITES.items()}


def test_pseudo_gradient_and_weighted_mean() -> None:
    grads = round_one_grads()
    np.testing.assert_array_equal(grads["a"]["w"], f32(0.5, -0.5))
    np.testing.assert_array_equal(grads["b"]["w"], f32(-0.5, 1.0))
    np.testing.assert_array_equal(weighted_mean(grads, TOKENS)["w"], f32(0.25, -0.125))


def test_the_mean_does_not_depend_on_the_order_the_sites_arrived_in() -> None:
    """The averaging actor collects submissions as they arrive; float32 sums round differently
    in another order, so the mean must not follow it (a run's weights would then depend on
    which site's upload finished first)."""
    rng = np.random.default_rng(0)
    grads = {site: {"w": rng.standard_normal(4096).astype(np.float32)} for site in ("a", "b", "c")}
    tokens = {"a": 2816, "b": 2560, "c": 768}
    first = weighted_mean(grads, tokens)["w"]
    for order in (("b", "a", "c"), ("c", "b", "a")):
        again = weighted_mean({site: grads[site] for site in order}, {site: tokens[site] for site in order})["w"]
        np.testing.assert_array_equal(again, first)


def test_average_is_the_token_weighted_mean_of_site_weights() -> None:
    global_params = {"w": GLOBAL["w"].copy()}
    result = AveragingOuterOptimizer().step(global_params, round_one_grads(), TOKENS)
    # θ − g = [0.75, 2.125] = (3·θ_a + θ_b) / 4
    np.testing.assert_allclose(result["w"], f32(0.75, 2.125), rtol=0, atol=1e-7)
    assert result is global_params  # in place


def test_nesterov_two_rounds_by_hand() -> None:
    outer = NesterovOuterOptimizer()  # lr 0.7, momentum 0.9
    params = {"w": GLOBAL["w"].copy()}
    weights = params["w"]
    outer.step(params, round_one_grads(), TOKENS)
    # v = g = [0.25, -0.125]; θ −= 0.7·(g + 0.9·v) = 1.33·g = [0.3325, -0.16625]
    np.testing.assert_allclose(params["w"], f32(0.6675, 2.16625), rtol=1e-6)
    np.testing.assert_allclose(outer.momentum_buffers["w"], f32(0.25, -0.125), rtol=1e-6)
    # Round 2: equal tokens, g = mean([0.1, 0], [0.1, 0.4]) = [0.1, 0.2]
    # v = 0.9·[0.25, -0.125] + g = [0.325, 0.0875]; θ −= 0.7·(g + 0.9·v) = [0.27475, 0.195125]
    outer.step(params, {"a": {"w": f32(0.1, 0.0)}, "b": {"w": f32(0.1, 0.4)}}, {"a": 5, "b": 5})
    np.testing.assert_allclose(params["w"], f32(0.39275, 1.971125), rtol=1e-6)
    np.testing.assert_allclose(outer.momentum_buffers["w"], f32(0.325, 0.0875), rtol=1e-6)
    assert params["w"] is weights  # updated in place, no new arrays


def nesterov_by_formula(
    params: dict[str, np.ndarray], buffers: dict[str, np.ndarray], grad: dict[str, np.ndarray], lr: float, mu: float
) -> None:
    """The outer step written out, in float32: ``v ← μ·v + g``; ``θ ← θ − lr·(g + μ·v)``."""
    lr32, mu32 = np.float32(lr), np.float32(mu)
    for name, value in params.items():
        buffers[name] = mu32 * buffers.get(name, np.zeros_like(value)) + grad[name]
        value -= lr32 * (grad[name] + mu32 * buffers[name])


def test_nesterov_step_is_the_formula_and_torch_sgd() -> None:
    """The outer step is the formula written out, and torch's SGD(nesterov=True) to an ulp
    (SGD adds ``−lr·d`` in one fused multiply-add where the formula rounds ``lr·d`` first)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (40, 30), "b": (7,), "scalar": ()}
    params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    expected, buffers = {name: value.copy() for name, value in params.items()}, {}
    references = {name: torch.nn.Parameter(torch.from_numpy(value.copy())) for name, value in params.items()}
    sgd = torch.optim.SGD(list(references.values()), lr=0.7, momentum=0.9, nesterov=True)
    outer = make_outer_optimizer("nesterov", lr=0.7, momentum=0.9)
    for _ in range(10):
        grads = {s: {n: rng.normal(size=shape).astype(np.float32) for n, shape in shapes.items()} for s in "ab"}
        tokens = {"a": int(rng.integers(1, 100)), "b": int(rng.integers(1, 100))}
        mean = weighted_mean(grads, tokens)
        nesterov_by_formula(expected, buffers, mean, 0.7, 0.9)
        for name, reference in references.items():
            reference.grad = torch.from_numpy(mean[name].copy())
        sgd.step()
        outer.step(params, grads, tokens)
        for name in shapes:
            np.testing.assert_array_equal(outer.momentum_buffers[name], buffers[name])
            np.testing.assert_allclose(params[name], expected[name], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(params[name], references[name].detach().numpy(), rtol=1e-5, atol=1e-6)
            assert outer.momentum_buffers[name].dtype == np.float32


def test_three_times_the_tokens_pulls_three_times_harder() -> None:
    grads = {"a": {"w": f32(1.0, -2.0)}, "b": {"w": f32(0.0, 0.0)}}
    heavy = weighted_mean(grads, {"a": 3_000, "b": 1_000})["w"]
    light = weighted_mean(grads, {"a": 1_000, "b": 3_000})["w"]
    np.testing.assert_allclose(heavy, 3 * light, rtol=1e-6)
    np.testing.assert_allclose(heavy, f32(0.75, -1.5), rtol=1e-6)


def test_sites_without_tokens_carry_no_weight() -> None:
    grads = {"a": {"w": f32(1.0, 1.0)}, "failed": {"w": f32(np.nan, np.inf)}}
    np.testing.assert_array_equal(weighted_mean(grads, {"a": 7, "failed": 0})["w"], f32(1.0, 1.0))
    with pytest.raises(ValueError, match="skip the outer step"):
        weighted_mean(grads, {"a": 0, "failed": 0})


def test_mismatches_are_reported() -> None:
    with pytest.raises(ValueError, match="one token count per site"):
        weighted_mean(round_one_grads(), {"a": 1})
    with pytest.raises(ValueError, match="missing \\['w'\\]"):
        pseudo_gradient(GLOBAL, {"v": f32(1.0, 2.0)})
    with pytest.raises(ValueError, match="writable float32"):
        AveragingOuterOptimizer().step({"w": GLOBAL["w"].astype(np.float64)}, round_one_grads(), TOKENS)
    with pytest.raises(ValueError, match="choose 'nesterov' or 'average'"):
        make_outer_optimizer("adam")  # type: ignore[arg-type]


def test_outer_state_round_trip() -> None:
    first, params = NesterovOuterOptimizer(lr=0.5, momentum=0.8), {"w": GLOBAL["w"].copy()}
    first.step(params, round_one_grads(), TOKENS)
    resumed = NesterovOuterOptimizer()
    resumed.load_state_dict(first.state_dict())
    assert (resumed.lr, resumed.momentum) == (0.5, 0.8)
    params_resumed = {"w": params["w"].copy()}
    first.step(params, round_one_grads(), TOKENS)
    resumed.step(params_resumed, round_one_grads(), TOKENS)
    np.testing.assert_array_equal(params["w"], params_resumed["w"])
    # the state the checkpoint writes: plain float32 numpy arrays by parameter name, copies
    state = first.state_dict()
    assert set(state) == {"name", "lr", "momentum", "momentum_buffers"}
    assert all(type(b) is np.ndarray and b.dtype == np.float32 for b in state["momentum_buffers"].values())
    assert not np.shares_memory(state["momentum_buffers"]["w"], first.momentum_buffers["w"])
    with pytest.raises(ValueError, match="same outer optimizer"):
        AveragingOuterOptimizer().load_state_dict(first.state_dict())


def test_bf16_round_trip_error_bound() -> None:
    rng = np.random.default_rng(1)
    delta = {
        "small": (rng.normal(size=(64, 32)) * 1e-6).astype(np.float32),
        "large": (rng.normal(size=(128,)) * 1e3).astype(np.float32),
        "exact": f32(0.0, 1.0, -2.0, 0.5),
    }
    packed = compress(delta)
    assert packed.dtype == "bf16"
    assert all(array.dtype == np.uint16 for array in packed.arrays.values())
    assert packed.num_bytes * 2 == sum(array.nbytes for array in delta.values())
    restored = decompress(packed)
    for name, original in delta.items():
        assert restored[name].dtype == np.float32 and restored[name].shape == original.shape
        # bf16 keeps 8 significant bits: round-to-nearest error is at most 2^-8 relative
        assert np.all(np.abs(restored[name] - original) <= 2.0**-8 * np.abs(original))
        as_torch = torch.from_numpy(original).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(restored[name], as_torch)
    np.testing.assert_array_equal(restored["exact"], delta["exact"])
    fp32 = decompress(compress(delta, dtype="fp32"))
    np.testing.assert_array_equal(fp32["large"], delta["large"])


def test_outer_momentum_rule_is_half_the_ceiling_at_the_inner_memory_and_nears_it_for_long_rounds() -> None:
    """μ = 0.9·H/(H + 10): the CPU demo's ~11-step rounds get the 0.5 once set by hand, DiLoCo's
    500-step rounds nearly its 0.9; never above the ceiling, rising with H."""
    assert outer_momentum_for(10) == pytest.approx(0.45)
    assert outer_momentum_for(11) == pytest.approx(0.4714, abs=1e-4)
    assert outer_momentum_for(100) == pytest.approx(0.8182, abs=1e-4)
    assert outer_momentum_for(500) == pytest.approx(0.8824, abs=1e-4)
    rising = [outer_momentum_for(h) for h in (0.5, 1, 3, 30, 300, 3000, 1e6)]
    assert rising == sorted(rising) and rising[-1] < 0.9
    assert outer_momentum_for(20, inner_beta1=0.8, ceiling=0.95) == pytest.approx(0.95 * 20 / 25)
    with pytest.raises(ValueError, match="inner steps per round must be > 0"):
        outer_momentum_for(0)


def test_forgetting_the_momentum_makes_the_next_step_a_first_step():
    from curtail.training.averaging import NesterovOuterOptimizer

    fresh, used = NesterovOuterOptimizer(lr=0.7, momentum=0.9), NesterovOuterOptimizer(lr=0.7, momentum=0.9)
    grad = {"w": np.full(3, 0.5, dtype=np.float32)}
    used.step({"w": np.zeros(3, dtype=np.float32)}, {"a": grad}, {"a": 1})
    used.forget_momentum()
    assert set(used.state_dict()["momentum_buffers"]) == {"w"}  # kept, zeroed: checkpoints keep their shape
    after_reset, first = np.ones(3, dtype=np.float32), np.ones(3, dtype=np.float32)
    used.step({"w": after_reset}, {"a": grad}, {"a": 1})
    fresh.step({"w": first}, {"a": grad}, {"a": 1})
    np.testing.assert_array_equal(after_reset, first)
