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


@ray.remote(num_cpus=0)
class Evaluator:
    def __init__(self, model_spec: dict[str, Any], vocab_size: int, seed: int, heldout_tokens: np.ndarray,
                 num_batches: int, batch_size: int, seq_len: int, torch_threads: int = 1):
        import torch

        from curtail.training.data import TokenCorpus
        from curtail.training.loop import SiteTrainer
        from curtail.training.model import ModelSpec

        torch.set_num_threads(torch_threads)
        self._trainer = SiteTrainer(ModelSpec(**model_spec), vocab_size, seed, device="cpu")
        self._heldout = TokenCorpus(np.asarray(heldout_tokens), "heldout")
        self._num_batches, self._batch_size, self._seq_len = num_batches, batch_size, seq_len

    def evaluate(self, snapshot: tuple[int, dict[str, np.ndarray]]) -> dict[str, Any]:
        """Held-out loss (nats/token) of one global-weights snapshot ``(version, params)``."""
        version, params = snapshot
        self._trainer.load_global(params)
        loss = self._trainer.evaluate(self._heldout, self._num_batches, self._batch_size, self._seq_len)
        return {"version": version, "loss": float(loss)}

    def save(self, snapshot: tuple[int, dict[str, np.ndarray]], directory: str, tokenizer: Any) -> str:
        """Save a snapshot as a Hugging Face model (with tokenizer) into ``directory``."""
        _, params = snapshot
        self._trainer.load_global(params)
        return str(self._trainer.save_pretrained(Path(directory), tokenizer))
