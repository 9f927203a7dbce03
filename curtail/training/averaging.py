"""Averaging: the DiLoCo outer step that merges the sites' rounds into the global weights.

Parameters travel as numpy float32 state dicts, ``dict[str, np.ndarray]`` (parameter name →
array), so the averaging actor needs no model and Ray's object store can share them
zero-copy.

After a round, site ``k`` sends its **pseudo-gradient** ``g_k = θ_global − θ_k`` (the
direction the global weights should move *against*, like a gradient). The outer step takes
the **token-weighted mean** ``g = Σ_k n_k g_k / Σ_k n_k`` (``n_k``: tokens site ``k`` trained
this round, so a site with 3× the tokens pulls 3× harder) and applies an
:class:`OuterOptimizer`:

- :class:`AveragingOuterOptimizer` (a run's default, ``outer_optimizer = "average"``): plain
  weighted averaging of the sites' weights, ``θ ← θ − g`` (lr 1, no momentum; FedAvg).
- :class:`NesterovOuterOptimizer` (DiLoCo's): SGD with Nesterov momentum,
  ``v ← μ·v + g``; ``θ ← θ − lr·(g + μ·v)``, lr 0.7, μ 0.9 (``torch.optim.SGD(nesterov=True)``'s update, to one ulp);
  runs set μ from their rounds' length (:func:`outer_momentum_for`).

A new outer optimizer is one small subclass implementing :meth:`OuterOptimizer.apply`.

The arithmetic runs through torch on views of the numpy arrays (the weights and momentum
buffers are updated in place): one multi-threaded pass per operation, which for the
561M-parameter ``d20`` takes the outer step from seconds to a fraction of one (docs/GPU.md).
Results are the numpy arrays either way.

How pseudo-gradients travel (bf16 by default; int8, int4, top-k, error feedback) is
:mod:`curtail.training.compression`.

Example::

    outer = make_outer_optimizer("nesterov")
    grads = {site: pseudo_gradient(global_params, params) for site, params in sites.items()}
    global_params = outer.step(global_params, grads, tokens_by_site)
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

StateDict = dict[str, np.ndarray]

OuterOptimizerName = Literal["nesterov", "average"]


def pseudo_gradient(global_params: Mapping[str, np.ndarray], site_params: Mapping[str, np.ndarray]) -> StateDict:
    """``θ_global − θ_site`` per parameter, as new float32 arrays."""
    _check_same_keys(global_params, site_params, "site parameters")
    result: StateDict = {}
    for name in global_params:
        left, right = np.asarray(global_params[name]), np.asarray(site_params[name])
        if left.shape != right.shape:
            raise ValueError(f"{name!r}: global shape {left.shape} != site shape {right.shape}")
        out = np.empty(left.shape, dtype=np.float32)
        torch.sub(tensor_view(left), tensor_view(right), out=torch.from_numpy(out))
        result[name] = out
    return result


def weighted_mean(
    pseudo_grads_by_site: Mapping[str, Mapping[str, np.ndarray]],
    tokens_by_site: Mapping[str, int | float],
) -> StateDict:
    """Token-weighted mean of the sites' pseudo-gradients (new float32 arrays).

    Sites with 0 tokens carry no weight. Raises ``ValueError`` if the sites of the two
    mappings differ, a token count is negative, or no site trained any tokens.
    """
    if set(pseudo_grads_by_site) != set(tokens_by_site):
        raise ValueError(
            f"pseudo-gradients from sites {sorted(pseudo_grads_by_site)} but token counts for "
            f"{sorted(tokens_by_site)}; pass one token count per site"
        )
    for site, tokens in tokens_by_site.items():
        if tokens < 0:
            raise ValueError(f"site {site!r} reported {tokens} tokens; token counts must be >= 0")
    total_tokens = float(sum(tokens_by_site.values()))
    if total_tokens <= 0:
        raise ValueError(
            "no site trained any tokens this round; skip the outer step instead of calling it"
        )
    # in name order, not arrival order: float32 sums round by order, and the result must not
    # depend on which site's upload finished first
    sites = sorted(site for site in pseudo_grads_by_site if tokens_by_site[site] > 0)
    reference = pseudo_grads_by_site[sites[0]]
    for site in sites:
        _check_same_keys(reference, pseudo_grads_by_site[site], f"site {site!r} pseudo-gradient")
    mean: StateDict = {}
    for name in reference:
        accumulator = np.empty(np.shape(reference[name]), dtype=np.float32)
        total = torch.from_numpy(accumulator)
        for index, site in enumerate(sites):
            grad = tensor_view(pseudo_grads_by_site[site][name])
            weight = float(np.float32(tokens_by_site[site] / total_tokens))
            if index == 0:
                torch.mul(grad, weight, out=total)
            else:
                total.add_(grad, alpha=weight)
        mean[name] = accumulator
    return mean


class OuterOptimizer(ABC):
    """Applies the token-weighted mean pseudo-gradient to the global parameters."""

    name: str = "outer"

    def step(
        self,
        global_params: StateDict,
        pseudo_grads_by_site: Mapping[str, Mapping[str, np.ndarray]],
        tokens_by_site: Mapping[str, int | float],
    ) -> StateDict:
        """One outer step. Updates ``global_params`` (float32 arrays) in place and returns it."""
        mean = weighted_mean(pseudo_grads_by_site, tokens_by_site)
        _check_same_keys(global_params, mean, "pseudo-gradients")
        for name, value in global_params.items():
            if value.dtype != np.float32 or not value.flags.writeable:
                raise ValueError(
                    f"global parameter {name!r} is {value.dtype}"
                    f"{'' if value.flags.writeable else ' read-only'}; the outer step updates "
                    "writable float32 arrays in place (copy them with np.array(x, np.float32))"
                )
            if value.shape != mean[name].shape:
                raise ValueError(
                    f"{name!r}: global shape {value.shape} != pseudo-gradient {mean[name].shape}"
                )
        self.apply(global_params, mean)
        return global_params

    @abstractmethod
    def apply(self, global_params: StateDict, mean_pseudo_grad: StateDict) -> None:
        """Update ``global_params`` in place from the mean pseudo-gradient."""

    def forget_momentum(self) -> None:
        """Drop the direction carried from earlier steps (none for plain averaging)."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state (numpy arrays and plain values), for checkpoints."""
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"outer optimizer state is for {state.get('name')!r}, this optimizer is "
                f"{self.name!r}; resume with the same outer optimizer"
            )


class AveragingOuterOptimizer(OuterOptimizer):
    """Plain weighted averaging: ``θ ← θ − mean g`` (= the token-weighted mean of site weights)."""

    name = "average"

    def apply(self, global_params: StateDict, mean_pseudo_grad: StateDict) -> None:
        for name, value in global_params.items():
            torch.from_numpy(value).sub_(tensor_view(mean_pseudo_grad[name]))


class NesterovOuterOptimizer(OuterOptimizer):
    """SGD with Nesterov momentum: ``v ← μ·v + g``; ``θ ← θ − lr·(g + μ·v)``.

    The momentum buffers are numpy arrays keyed by parameter name (``momentum_buffers``, the
    checkpoint's ``outer_momentum.safetensors``), so the checkpoint format is the optimizer's,
    not torch's.
    """

    name = "nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        if not lr > 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.momentum = momentum
        self.momentum_buffers: StateDict = {}

    def apply(self, global_params: StateDict, mean_pseudo_grad: StateDict) -> None:
        # torch.optim.SGD(nesterov=True) computes this update too, but fuses θ − lr·d into one
        # multiply-add where this rounds lr·d first: ~2% of weights then differ by one ulp per
        # step. The explicit form keeps runs and checkpoints bit-identical to earlier releases;
        # tests/test_training_averaging.py checks that it agrees with SGD to that ulp.
        lr, mu = float(np.float32(self.lr)), float(np.float32(self.momentum))
        for name, value in global_params.items():
            grad = torch.from_numpy(mean_pseudo_grad[name])  # our own copy from weighted_mean
            buffer = self.momentum_buffers.get(name)
            if buffer is None:
                buffer = self.momentum_buffers[name] = np.zeros_like(value)
            momentum = torch.from_numpy(buffer)
            momentum.mul_(mu).add_(grad)
            grad.add_(momentum, alpha=mu).mul_(lr)
            torch.from_numpy(value).sub_(grad)

    def forget_momentum(self) -> None:
        """Zero the momentum buffers (kept, so checkpoints keep their shape): the next step is
        the first step's ``lr·(1 + μ)·g``."""
        for buffer in self.momentum_buffers.values():
            buffer.fill(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "momentum_buffers": {name: buf.copy() for name, buf in self.momentum_buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.momentum_buffers = {
            name: np.array(buf, dtype=np.float32) for name, buf in state["momentum_buffers"].items()
        }


def outer_momentum_for(inner_steps_per_round: float, inner_beta1: float = 0.9, ceiling: float = 0.9) -> float:
    """The outer Nesterov momentum for rounds of ``H = inner_steps_per_round`` inner steps (the
    ``outer_momentum = "auto"`` rule): ``μ = ceiling · H / (H + 1/(1 − β₁))``.

    DiLoCo's μ = 0.9 is for rounds of hundreds of inner steps, where the outer momentum is what
    carries a direction from one round to the next. The inner AdamW already carries it for
    ``1/(1 − β₁)`` steps (10 at β₁ = 0.9): in rounds about that short, consecutive
    pseudo-gradients point the same way and a full outer momentum counts the direction again
    and overshoots. So μ is half the ceiling at ``H = 1/(1 − β₁)`` and approaches it as rounds
    grow: 0.47 at H = 11 (the CPU demo's rounds, where 0.5 had been set by hand), 0.82 at 100,
    0.88 at 500 (DiLoCo's rounds, with 0.9). The outer learning rate stays DiLoCo's 0.7.
    Measured, plain averaging ends closer to the centralized model than this rule at H = 11, 110
    and 114 (docs/BENCHMARKS.md), so it applies only where a run chooses the Nesterov step.
    """
    if not inner_steps_per_round > 0:
        raise ValueError(f"inner steps per round must be > 0, got {inner_steps_per_round}")
    memory_steps = 1.0 / (1.0 - inner_beta1)
    return ceiling * inner_steps_per_round / (inner_steps_per_round + memory_steps)


def make_outer_optimizer(name: OuterOptimizerName = "nesterov", **kwargs: float) -> OuterOptimizer:
    """``"nesterov"`` (kwargs ``lr``, ``momentum``) or ``"average"``."""
    if name == "nesterov":
        return NesterovOuterOptimizer(**kwargs)
    if name == "average":
        if kwargs:
            raise ValueError(f"the 'average' outer optimizer takes no options, got {sorted(kwargs)}")
        return AveragingOuterOptimizer()
    raise ValueError(f"unknown outer optimizer {name!r}; choose 'nesterov' or 'average'")


def tensor_view(array: Any) -> torch.Tensor:
    """A torch view of a numpy array (float32 unless it is an integer bit pattern); read-only
    arrays (Ray's object store) are only read, so torch's warning about them is silenced."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _check_same_keys(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    if set(expected) != set(actual):
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        raise ValueError(
            f"{what} do not match the global parameters: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; were they exported from the same model preset?"
        )
