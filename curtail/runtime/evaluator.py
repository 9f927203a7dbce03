"""Held-out evaluation of the global model, off the training path.

After every sync the coordinator hands the evaluator a reference to that sync's global
weights (an object-store snapshot straight from the averaging actor) and moves on; the
evaluator scores them on the held-out split in the background, so no site ever pauses for an
evaluation. At the end it evaluates the final global model and saves it in the Hugging Face
format (``save_pretrained``, with the tokenizer), loadable by ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray

from curtail.runtime.protocol import EvalConfig, open_tokens


@ray.remote(num_cpus=0)
class Evaluator:
    """Scores global-weights snapshots on the held-out split (off the training path; on CPUs, or
    on a share of a GPU with ``training.eval_gpus``).

    Example::

        evaluator = Evaluator.remote(EvalConfig(model, ray.put(heldout), num_batches=8, batch_size=8))
        loss = ray.get(evaluator.evaluate.remote(averager.get_global.remote()))["loss"]
    """

    def __init__(self, config: EvalConfig):
        import torch

        from curtail.training.data import TokenCorpus
        from curtail.training.loop import SiteTrainer

        torch.set_num_threads(config.model.torch_threads)
        self._config = config
        self._trainer = SiteTrainer(config.model.spec, config.model.vocab_size, config.model.seed, device=config.device)
        self._heldout = TokenCorpus(open_tokens(config.heldout_tokens), "heldout")

    def evaluate(self, snapshot: tuple[int, dict[str, np.ndarray]]) -> dict[str, Any]:
        """Held-out loss (nats/token) of one global-weights snapshot ``(version, params)``."""
        version, params = snapshot
        self._trainer.load_global(params)
        loss = self._trainer.evaluate(
            self._heldout, self._config.num_batches, self._config.batch_size, self._config.model.seq_len
        )
        return {"version": version, "loss": float(loss)}

    def save(self, snapshot: tuple[int, dict[str, np.ndarray]], directory: str, tokenizer: Any) -> str:
        """Save a snapshot as a Hugging Face model (with tokenizer) into ``directory``."""
        _, params = snapshot
        self._trainer.load_global(params)
        return str(self._trainer.save_pretrained(Path(directory), tokenizer))
