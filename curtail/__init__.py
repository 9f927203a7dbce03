"""curtail: train language models on Ray across sites, only while their grids curtail renewables.

Python API (imports are lazy so ``import curtail`` stays light; its one side effect: two
optional dependencies' import-time warnings are quieted, see ``_quiet_optional_imports``)::

    import curtail
    result = curtail.simulate("experiments/paper.toml")   # fast simulator, run directories
    result.table()
    trained = curtail.run()                               # real training on a local Ray cluster
    swept = curtail.sweep("experiments/sweep_policies.toml")  # Ray Tune over policies
    curtail.prepare_shards(["corpus/"], "data/shards/mine")  # token shards: [training] corpus_shards
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _quiet_optional_imports() -> None:
    """transformers imports torchao whenever it is installed (the ``fp8`` extra); torchao then
    warns, on every process start, about its C++ kernels for other torch builds, which float8
    training does not use, and torch about the enums it registers. A CLI error is one line."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_optional_imports()

_API = {
    "simulate": "curtail.api",
    "run": "curtail.api",
    "replay": "curtail.api",
    "shadow": "curtail.shadow",
    "RunResult": "curtail.api",
    "SimulationResult": "curtail.api",
    "load_experiment": "curtail.config",
    "ExperimentConfig": "curtail.config",
    "read_run_dir": "curtail.runlog",
    "sweep": "curtail.policy_sweep",
    "SweepResult": "curtail.policy_sweep",
    "prepare_shards": "curtail.training.prepare",
}

__all__ = sorted(_API)  # noqa: PLE0605 -- the names of the lazily imported API


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'curtail' has no attribute {name!r}")
