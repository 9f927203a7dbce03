"""Inner loop: one site's model and inner optimizer, trained step by step between syncs.

A :class:`SiteTrainer` is the long-lived state of a site worker: the model, and an AdamW
inner optimizer whose moments persist across rounds (no respawn, no reload, no cold
optimizer per round — a weak point of the prior system). Between rounds the runtime swaps
weights through numpy:

- :meth:`SiteTrainer.load_global` copies the new global weights in (optimizer state kept);
- :meth:`SiteTrainer.export_params` copies the weights out as float32 numpy arrays, the
  input of :func:`curtail.training.averaging.pseudo_gradient`.

:meth:`SiteTrainer.train_step` takes one batch (``[batch, seq]`` inputs and next-token
labels, as :meth:`~curtail.training.data.TokenCorpus.batch` gives) and the learning rate the
global :mod:`~curtail.training.schedule` says, optionally splitting it into micro-batches
(gradient accumulation) and clipping the gradient norm. Inside a site with several GPUs, run
one trainer per rank under ``torch.distributed``: if a process group is initialised with more
than one rank, gradients are all-reduced (averaged) before each optimizer step, so every rank
keeps identical weights (plain data parallelism, no DDP wrapper). Give each rank its own
slice of the batch.

Example::

    trainer = SiteTrainer("tiny", vocab_size=len(tokenizer), seed=0)
    input_ids, labels = train.batch(0, batch_size=8, seq_len=64)
    loss = trainer.train_step(input_ids, labels, lr=3e-3)
    trainer.evaluate(heldout, num_batches=4, batch_size=8)
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from curtail.training.data import TokenCorpus
from curtail.training.model import ModelSpec, build_model, get_spec

#: Gradient elements per all-reduce (64M float32 = 256 MiB of extra memory at most).
_ALL_REDUCE_BUCKET_NUMEL = 1 << 26


class SiteTrainer:
    """A site's model + AdamW inner optimizer; see the module doc.

    Args:
        preset: model preset name or :class:`~curtail.training.model.ModelSpec`.
        vocab_size: tokenizer vocabulary (``len(tokenizer)``); default: the preset's.
        seed: initialisation seed; the same seed gives the same weights on every site.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; default CUDA if available.
        weight_decay, betas, eps: AdamW settings (decay applies to matrices only).
        grad_clip_norm: clip the global gradient norm to this; ``None`` disables.
        micro_batch_size: rows per forward/backward; a larger batch is accumulated.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision on GPUs; weights and
            optimizer state stay float32.
        process_group: ``torch.distributed`` group of this site's ranks; default the world
            group when ``torch.distributed`` is initialised.
        compile_model: run forward/backward through ``torch.compile`` (GPUs: faster steps
            after a one-off compilation; the trainer is long-lived, so it compiles once).
    """

    def __init__(
        self,
        preset: str | ModelSpec,
        vocab_size: int | None = None,
        seed: int = 0,
        *,
        device: str | torch.device | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        grad_clip_norm: float | None = 1.0,
        micro_batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        process_group: dist.ProcessGroup | None = None,
        compile_model: bool = False,
    ) -> None:
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}")
        if micro_batch_size is not None and micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0 or None, got {micro_batch_size}")
        self.spec = get_spec(preset)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: LlamaForCausalLM = build_model(self.spec, vocab_size, seed, self.device)
        self.model.train()
        # The compiled wrapper shares the model's parameters; save and export use the model.
        self._forward = torch.compile(self.model) if compile_model else self.model
        self.vocab_size = int(self.model.config.vocab_size)
        self.grad_clip_norm = grad_clip_norm
        self.micro_batch_size = micro_batch_size
        self.autocast_dtype = autocast_dtype
        self.process_group = process_group
        self.num_steps = 0
        self.tokens_trained = 0

        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=0.0,  # set every step from the global schedule
            betas=betas,
            eps=eps,
            fused=self.device.type == "cuda",
        )
        self._params = dict(self.model.named_parameters())

    # ---------------------------------------------------------------------------------------
    # Weights in and out

    @property
    def param_names(self) -> list[str]:
        return list(self._params)

    def load_global(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy global weights (float32 numpy, names as :meth:`export_params`) into the model.

        The inner optimizer's state is kept: DiLoCo's inner AdamW continues across rounds.
        """
        if set(state) != set(self._params):
            missing = sorted(set(self._params) - set(state))
            extra = sorted(set(state) - set(self._params))
            raise ValueError(
                f"global weights do not match this model: missing {missing[:5]}, unexpected "
                f"{extra[:5]}; export them from a model of the same preset and vocabulary"
            )
        with torch.no_grad():
            for name, param in self._params.items():
                array = state[name]
                if tuple(array.shape) != tuple(param.shape):
                    raise ValueError(
                        f"global weight {name!r} has shape {tuple(array.shape)}, the model "
                        f"{tuple(param.shape)}; same preset and vocabulary needed"
                    )
                with warnings.catch_warnings():
                    # Arrays from Ray's object store are read-only; we only read them.
                    warnings.simplefilter("ignore", UserWarning)
                    source = torch.as_tensor(np.asarray(array))
                param.copy_(source)

    def export_params(self) -> dict[str, np.ndarray]:
        """The current weights as float32 numpy arrays (copies, safe to keep and send)."""
        with torch.no_grad():
            return {
                name: param.detach().to("cpu", torch.float32).numpy().copy()
                for name, param in self._params.items()
            }

    # ---------------------------------------------------------------------------------------
    # Steps

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
        """One optimizer step on a batch; returns its mean loss (averaged over ranks).

        ``input_ids`` and ``labels`` are ``int64 [batch, seq]``; ``labels[i, j]`` is the token
        that follows ``input_ids[i, j]``.
        """
        if input_ids.shape != labels.shape or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must both "
                "be [batch, seq]"
            )
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch_size = input_ids.shape[0]
        micro = self.micro_batch_size or batch_size
        loss_sum = torch.zeros((), device=self.device)
        for first in range(0, batch_size, micro):
            rows = slice(first, first + micro)
            inputs = input_ids[rows].to(self.device, non_blocking=True)
            targets = labels[rows].to(self.device, non_blocking=True)
            loss = self._loss(inputs, targets)
            # Weight each micro-batch by its rows so the sum is the batch mean.
            (loss * (inputs.shape[0] / batch_size)).backward()
            loss_sum += loss.detach() * inputs.shape[0]
        mean_loss = loss_sum / batch_size
        world = self._world_size()
        if world > 1:
            self._all_reduce_gradients(world)
            dist.all_reduce(mean_loss, group=self.process_group)
            mean_loss /= world
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        self.tokens_trained += input_ids.numel() * world
        return float(mean_loss)

    @torch.no_grad()
    def evaluate(
        self,
        corpus: TokenCorpus,
        num_batches: int,
        batch_size: int,
        seq_len: int | None = None,
    ) -> float:
        """Mean next-token loss (nats) over ``num_batches`` batches spread evenly over ``corpus``.

        The batches are the same every call (deterministic), so losses are comparable across
        rounds and sites. Fewer batches are used if the corpus is too short.
        """
        seq_len = seq_len or self.spec.seq_len
        if num_batches <= 0:
            raise ValueError(f"num_batches must be > 0, got {num_batches}")
        num_batch_tokens = batch_size * seq_len
        last_start = corpus.num_trainable_tokens - num_batch_tokens
        if last_start < 0:
            raise ValueError(
                f"{corpus.name} has {corpus.num_tokens} tokens, fewer than one {batch_size}x"
                f"{seq_len} batch; use a smaller batch or a larger held-out corpus"
            )
        num_batches = min(num_batches, last_start // num_batch_tokens + 1)
        starts = np.linspace(0, last_start, num_batches).astype(np.int64)
        was_training = self.model.training
        self.model.eval()
        try:
            losses = []
            for start in starts:
                input_ids, labels = corpus.batch(int(start), batch_size, seq_len)
                micro = self.micro_batch_size or batch_size
                for first in range(0, batch_size, micro):
                    rows = slice(first, first + micro)
                    loss = self._loss(input_ids[rows].to(self.device), labels[rows].to(self.device))
                    losses.append(float(loss) * input_ids[rows].shape[0])
            return sum(losses) / (len(starts) * batch_size)
        finally:
            self.model.train(was_training)

    # ---------------------------------------------------------------------------------------
    # Saving

    def save_pretrained(
        self, directory: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase | None = None
    ) -> Path:
        """Write the model (safetensors + config) and the tokenizer, loadable with
        ``AutoModelForCausalLM.from_pretrained(directory)`` / ``AutoTokenizer``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    def optimizer_state_dict(self) -> dict[str, Any]:
        """A snapshot of the inner optimizer (CPU tensor copies; ``torch.save`` it) and counters.

        Copies, so training on does not change a snapshot being written (costs host memory of
        twice the parameters: AdamW's two moments).
        """
        return {
            "optimizer": _to_cpu_copy(self.optimizer.state_dict()),
            "num_steps": self.num_steps,
            "tokens_trained": self.tokens_trained,
        }

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` (after :meth:`load_global` on resume).

        The state is copied in; ``state`` is left untouched and unshared.
        """
        # torch's load_state_dict keeps same-device tensors as they are: copy, so two trainers
        # loaded from one snapshot do not share (and doubly update) their moments.
        self.optimizer.load_state_dict(_to_cpu_copy(state["optimizer"]))
        self.num_steps = int(state.get("num_steps", 0))
        self.tokens_trained = int(state.get("tokens_trained", 0))

    # ---------------------------------------------------------------------------------------

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self._forward(input_ids=input_ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _all_reduce_gradients(self, world: int) -> None:
        # Flat buckets: a few collectives instead of one per parameter, bounded extra memory.
        bucket: list[torch.Tensor] = []
        bucket_numel = 0
        for param in self.model.parameters():
            if param.grad is None:
                continue
            bucket.append(param.grad)
            bucket_numel += param.grad.numel()
            if bucket_numel >= _ALL_REDUCE_BUCKET_NUMEL:
                self._all_reduce_bucket(bucket, world)
                bucket, bucket_numel = [], 0
        if bucket:
            self._all_reduce_bucket(bucket, world)

    def _all_reduce_bucket(self, grads: list[torch.Tensor], world: int) -> None:
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=self.process_group)
        flat /= world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _to_cpu_copy(value: Any) -> Any:
    """Deep copy of nested dicts / lists with every tensor cloned onto the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu_copy(item) for item in value)
    return value
