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

Speed (GPUs; docs/GPU.md has the measured effect of each): ``compile_model`` compiles the
whole loss — model and cross-entropy in one graph, so the float32 upcast of the
``[tokens, vocab]`` logits is fused into the loss kernels instead of being materialised;
``fused_cross_entropy`` goes further and never holds the logits at all
(:func:`linear_cross_entropy`: the LM head and the loss chunk by chunk, the head's gradients
computed in the forward pass), which frees memory for larger micro-batches;
``pad_mlp_multiple`` zero-pads the SwiGLU width inside the forward pass (d20's 3413 to 3456:
cuBLAS runs the unaligned shape at a fifth of its speed) — the padded units are exact zeros,
so the function and the parameters are unchanged; ``train_step(..., sync=False)`` returns the loss as a device tensor so the host never waits for
the GPU inside a round. :meth:`SiteTrainer.compressed_pseudo_gradient` computes the round's
pseudo-gradient on the device against a device copy of the weights the round started from and
moves only the bf16 result to the host.

Example::

    trainer = SiteTrainer("tiny", vocab_size=len(tokenizer), seed=0)
    input_ids, labels = train.batch(0, batch_size=8, seq_len=64)
    loss = trainer.train_step(input_ids, labels, lr=3e-3)
    trainer.evaluate(heldout, num_batches=4, batch_size=8)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import types
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from curtail.training.averaging import pseudo_gradient
from curtail.training.compression import CompressedState, ErrorFeedback, WireFormat
from curtail.training.data import TokenCorpus
from curtail.training.float8 import convert_linears, project
from curtail.training.fsdp import (
    local,
    optimizer_state_from_local,
    optimizer_state_to_local,
    route_through_root,
    shard_model,
    shard_rows,
)
from curtail.training.model import ModelSpec, build_model, get_spec, use_causal_sdpa

#: Gradient elements per all-reduce (64M float32 = 256 MiB of extra memory at most).
_ALL_REDUCE_BUCKET_NUMEL = 1 << 26
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")  # torch.compile's


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
        compile_model: run the loss (model forward + cross-entropy) and its backward through
            ``torch.compile`` (GPUs: faster steps after a one-off compilation of tens of
            seconds; the trainer is long-lived, so it compiles once). Evaluation stays eager.
        compile_mode: ``torch.compile``'s mode for the model and loss (``"default"``;
            ``"max-autotune-no-cudagraphs"`` also benchmarks Triton templates against the
            matmul libraries and tunes each fused kernel's launch, at minutes of compilation).
        fused_cross_entropy: compute the LM head and the cross-entropy in chunks of
            ``loss_chunk_tokens`` tokens (:func:`linear_cross_entropy`) so the full
            ``[tokens, vocab]`` logits never exist; same function, less memory.
        loss_chunk_tokens: tokens per chunk of the fused cross-entropy.
        pad_mlp_multiple: pad the MLP width to a multiple of this inside the forward pass
            (exact: the extra units are zeros and receive no gradient); default 64 on CUDA,
            off elsewhere; 0 disables.
        parallelism: ``"ddp"``: every rank holds the whole model (gradients all-reduced);
            ``"fsdp"``: each rank holds a dim-0 shard of every parameter, its gradients and its
            AdamW moments (:mod:`curtail.training.fsdp`; needs ``torch.distributed``). Weights in
            and out (:meth:`load_global`, :meth:`compressed_pseudo_gradient`, the merges) then
            touch this rank's rows only.
        activation_checkpointing: recompute each layer's activations in the backward pass
            instead of keeping them (less memory, about a third more compute).
        fp8_linear: train the decoder blocks' linear layers in float8
            (:mod:`curtail.training.float8`, torchao; Hopper-class GPUs). The MLP is padded
            (``pad_mlp_multiple`` default 64 also on CPUs) so its matmuls qualify.
        fp8_recipe: float8 scaling (``tensorwise``, ``rowwise``, ``rowwise_with_gw_hp``).
        keep_reference: keep a device copy of the weights last loaded by :meth:`load_global`
            so :meth:`compressed_pseudo_gradient` needs no host round trip (one more copy of
            the parameters in device memory). Default: on CUDA only (on a CPU the reference
            arrays are used in place, with no copy).
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
        compile_mode: str = "default",
        fused_cross_entropy: bool = False,
        loss_chunk_tokens: int = 8192,
        keep_reference: bool | None = None,
        pad_mlp_multiple: int | None = None,
        parallelism: str = "ddp",
        activation_checkpointing: bool = False,
        fp8_linear: bool = False,
        fp8_recipe: str = "tensorwise",
    ) -> None:
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}")
        if micro_batch_size is not None and micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0 or None, got {micro_batch_size}")
        if loss_chunk_tokens <= 0:
            raise ValueError(f"loss_chunk_tokens must be > 0, got {loss_chunk_tokens}")
        if parallelism not in ("ddp", "fsdp"):
            raise ValueError(f'parallelism must be "ddp" or "fsdp", got {parallelism!r}')
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.spec = get_spec(preset)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: LlamaForCausalLM = build_model(self.spec, vocab_size, seed, self.device)
        use_causal_sdpa(self.model)  # no [seq, seq] mask under torch.compile: causal kernels
        self.model.train()
        if pad_mlp_multiple is None:
            pad_mlp_multiple = 64 if self.device.type == "cuda" or fp8_linear else 0
        self.pad_mlp_multiple = pad_mlp_multiple
        if pad_mlp_multiple:
            pad_mlp_width(self.model, pad_mlp_multiple)
        self.float8_layers = convert_linears(self.model, fp8_recipe) if fp8_linear else []
        if activation_checkpointing:  # recompute each layer's activations in the backward pass
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name warns
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.sharded = parallelism == "fsdp"
        if self.sharded:  # before the compiled wrappers and the optimizer: both see the sharded parameters
            shard_model(self.model, process_group, self.device, autocast_dtype)
        self.compile_model = compile_model
        self.fused_cross_entropy = fused_cross_entropy
        self.loss_chunk_tokens = loss_chunk_tokens
        self.keep_reference = self.device.type == "cuda" if keep_reference is None else keep_reference
        self.error_feedback = ErrorFeedback()  # the residual of lossy transfers (compression.py)
        # Compiled wrappers share the model's parameters; save and export use the model. With
        # the fused loss the model body is compiled and the chunked head + loss (its own small
        # compiled kernels) runs between the body's forward and backward graphs.
        if fused_cross_entropy:
            body = torch.compile(self.model.model, mode=compile_mode) if compile_model else self.model.model
            self._train_loss = lambda ids, targets: self._fused_loss(body, ids, targets)
            if self.sharded:  # from inside the root's own call: FSDP gathers the embeddings and the head for it
                self._train_loss = route_through_root(self.model, self._train_loss)
        else:
            self._train_loss = torch.compile(self._loss, mode=compile_mode) if compile_model else self._loss
        self._reference: dict[str, torch.Tensor] | None = None
        self._reference_source: Mapping[str, np.ndarray] | None = None
        self._sent: dict[str, torch.Tensor] | None = None  # the weights at an overlapped submit
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
        self._params = dict(self.model.named_parameters())  # DTensors under FSDP
        self._rows = {name: shard_rows(param) for name, param in self._params.items()}  # this rank's rows of each

    # ---------------------------------------------------------------------------------------
    # Weights in and out

    def load_global(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy global weights (float32 numpy, names as :meth:`export_params`) into the model
        (under FSDP this rank's rows of each).

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
                    source = torch.as_tensor(np.asarray(array)[self._rows[name]])
                local(param).copy_(source, non_blocking=True)
            if self.keep_reference:
                self._reference = {name: local(param).detach().clone() for name, param in self._params.items()}
                self._reference_source = state
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def hold_sent(self, names: Iterable[str] | None = None) -> None:
        """Keep a device copy of the weights as just submitted (``θ_sent`` of an overlapped sync),
        of ``names`` only when a fragment of the model was submitted."""
        with torch.no_grad():
            sent = {name: local(self._params[name]).detach().clone() for name in (names or self._params)}
        self._sent = {**(self._sent or {}), **sent}

    def stage_global(self, state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``state`` (the whole model or a fragment) copied to the device for :meth:`merge_global`;
        safe to call from a transfer thread while this one trains (its own CUDA stream; on a CPU
        the arrays are viewed)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays: only read
            rows = {name: np.asarray(array)[self._rows[name]] for name, array in state.items()}  # (FSDP: this rank's)
            if self.device.type != "cuda":
                return {name: torch.as_tensor(array) for name, array in rows.items()}
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                staged = {name: torch.as_tensor(array).to(self.device, non_blocking=True) for name, array in rows.items()}
            stream.synchronize()
            return staged

    def merge_global(self, staged: Mapping[str, torch.Tensor], reference: Mapping[str, np.ndarray]) -> None:
        """An overlapped sync's arrival (the whole model or a fragment): ``θ ← θ_global + (θ −
        θ_sent)``, the merged weights plus the local steps taken since the submit
        (:meth:`hold_sent`). With no step since, ``θ − θ_sent`` is exactly 0 and this is
        :meth:`load_global`. ``reference`` is the site's whole reference after the merge (the
        mapping later passed to :meth:`compressed_pseudo_gradient`)."""
        missing = sorted(set(staged) - set(self._sent or {}))
        if missing:
            raise RuntimeError(f"merge_global without hold_sent for {missing[:3]}: no submitted weights to merge against")
        with torch.no_grad():
            for name, tensor in staged.items():
                local(self._params[name]).sub_(self._sent.pop(name)).add_(tensor)
            if self.keep_reference:
                merged = {name: tensor.to(torch.float32) for name, tensor in staged.items()}
                self._reference = {**(self._reference or {}), **merged}
                self._reference_source = reference
        if not self._sent:
            self._sent = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def weights_fingerprint(self) -> str:
        """A 16-hex-digit fingerprint of the exact weights, computed on the device: per
        parameter the int64 sum of its float32 bit patterns (integer sums are exact, so the
        order of the reduction does not matter). Equal weights give equal fingerprints on any
        device; it replaces hashing an exported copy (seconds for d20) when sites compare
        their weights after a sync. Under FSDP the ranks' sums are added: a collective, every
        rank calls it."""
        with torch.no_grad():
            sums = torch.stack([
                torch.sum(local(param).detach().to(torch.float32).view(torch.int32), dtype=torch.int64)
                for param in self._params.values()
            ])
            if self.sharded:
                dist.all_reduce(sums, group=self.process_group)
            sums = sums.tolist()
        hasher = hashlib.sha256()
        for name, value in zip(self._params, sums, strict=True):
            hasher.update(f"{name}={value};".encode())
        return hasher.hexdigest()[:16]

    def export_params(self) -> dict[str, np.ndarray]:
        """The current weights as float32 numpy arrays (copies, safe to keep and send). Under
        FSDP the whole weights, gathered: a collective, every rank calls it."""
        with torch.no_grad():
            params = {name: param.full_tensor() if self.sharded else param for name, param in self._params.items()}
            if self.device.type == "cpu":
                return {name: param.detach().to(torch.float32, copy=True).numpy() for name, param in params.items()}
            return _to_host_flat({name: param.detach() for name, param in params.items()}, torch.float32)

    def export_rows(self) -> dict[str, np.ndarray]:
        """This rank's rows of the weights (under FSDP; the whole weights otherwise) as float32 numpy copies."""
        if not self.sharded:
            return self.export_params()
        with torch.no_grad():
            rows = {name: local(param).detach() for name, param in self._params.items()}
            if self.device.type == "cpu":
                return {name: tensor.to(torch.float32, copy=True).numpy() for name, tensor in rows.items()}
            return _to_host_flat(rows, torch.float32)

    def compressed_pseudo_gradient(
        self, reference: Mapping[str, np.ndarray], wire: WireFormat | str = "bf16", *, frame: bool = True,
        names: Iterable[str] | None = None,
    ) -> CompressedState:
        """``reference − current weights``, packed for transfer in the ``wire`` format (a
        :class:`~curtail.training.compression.WireFormat` or a codec name), computed on the
        device; with error feedback the residual of earlier rounds is added first and this
        round's is kept (:attr:`error_feedback`, saved with :meth:`optimizer_state_dict`).

        When ``reference`` is the mapping last passed to :meth:`load_global` (and
        ``keep_reference``), the device copy kept then is used and only the packed result
        crosses to the host; otherwise the reference is uploaded tensor by tensor. With
        ``frame=False`` an entropy-coded format's codes come back raw (a transfer thread frames
        them: :func:`~curtail.training.compression.entropy_code`). ``names``: only these
        parameters (a fragment of the model; their residuals only are updated).
        """
        wire = wire if isinstance(wire, WireFormat) else WireFormat(codec=wire)  # type: ignore[arg-type]
        if set(reference) != set(self._params):
            pseudo_gradient(reference, {name: np.empty(0) for name in self._params})  # raises
        cached = self._reference if reference is self._reference_source else None
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays
            deltas = {}
            for name in names or self._params:
                param = local(self._params[name])
                if cached is not None:
                    start = cached[name]
                else:
                    rows = np.asarray(reference[name], dtype=np.float32)[self._rows[name]]
                    start = torch.as_tensor(rows).to(self.device)
                deltas[name] = torch.sub(start, param.detach())
            if not wire.entropy_coded:  # the dense casts: a few large device-to-host copies
                wire_dtype = torch.bfloat16 if wire.codec == "bf16" else torch.float32
                arrays = _to_host_flat(deltas, wire_dtype)
                if wire.codec == "bf16":
                    arrays = {name: array.view(np.uint16) for name, array in arrays.items()}
                return CompressedState(wire.codec, arrays)
            return self.error_feedback.pack(deltas, wire, frame=frame)

    # ---------------------------------------------------------------------------------------
    # Steps

    def train_step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, lr: float, *, sync: bool = True
    ) -> Any:
        """One optimizer step on a batch; returns its mean loss (averaged over ranks).

        ``input_ids`` and ``labels`` are ``int64 [batch, seq]``; ``labels[i, j]`` is the token
        that follows ``input_ids[i, j]``. ``sync=False`` returns the loss as a 0-d device tensor
        without waiting for the device (call ``float()`` on it when reporting), so the host
        queues the next step while this one runs.
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
            loss = self._train_loss(inputs, targets)
            # Weight each micro-batch by its rows so the sum is the batch mean.
            (loss * (inputs.shape[0] / batch_size)).backward()
            loss_sum += loss.detach() * inputs.shape[0]
        mean_loss = loss_sum / batch_size
        world = self._world_size()
        if world > 1:
            if not self.sharded:  # FSDP reduce-scattered them in the backward pass
                self._all_reduce_gradients(world)
            dist.all_reduce(mean_loss, group=self.process_group)
            mean_loss /= world
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        self.tokens_trained += input_ids.numel() * world
        return float(mean_loss) if sync else mean_loss

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
        starts = corpus.evaluation_starts(num_batches, batch_size, seq_len)
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
        state = self.optimizer.state_dict()
        return {
            "optimizer": _to_cpu_copy(optimizer_state_to_local(state) if self.sharded else state),
            "num_steps": self.num_steps,
            "tokens_trained": self.tokens_trained,
            "error_feedback": self.error_feedback.state_dict(),
        }

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` (after :meth:`load_global` on resume).

        The state is copied in; ``state`` is left untouched and unshared.
        """
        # torch's load_state_dict keeps same-device tensors as they are: copy, so two trainers
        # loaded from one snapshot do not share (and doubly update) their moments.
        optimizer = _to_cpu_copy(state["optimizer"])
        if self.sharded:  # this rank's shard of each moment, laid out like its parameter again
            params = [param for group in self.optimizer.param_groups for param in group["params"]]
            optimizer = optimizer_state_from_local(optimizer, params)
        self.optimizer.load_state_dict(optimizer)
        self.num_steps = int(state.get("num_steps", 0))
        self.tokens_trained = int(state.get("tokens_trained", 0))
        self.error_feedback.load_state_dict(state.get("error_feedback", {}), self.device)

    # ---------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(input_ids=input_ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def _fused_loss(self, body: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            hidden = body(input_ids=input_ids).last_hidden_state
        return linear_cross_entropy(
            hidden.flatten(0, 1), self.model.lm_head.weight, labels.flatten(),
            chunk_tokens=self.loss_chunk_tokens, compute_dtype=self.autocast_dtype,
            compile_chunks=self.compile_model,
        )

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


# -------------------------------------------------------------------------------------------
# Fused LM head + cross-entropy


def pad_mlp_width(model: torch.nn.Module, multiple: int = 64) -> int:
    """Make every SwiGLU MLP of ``model`` compute at a width padded to ``multiple``; returns
    how many MLPs were changed.

    The parameters keep their shapes (checkpoints, export and the optimizer see nothing); the
    forward pass zero-pads the gate/up weights' rows and the down weight's columns, so the
    extra units are ``silu(0)·0 = 0`` and their padded weights get no gradient (padding's
    backward is a slice). Same function, aligned matrix shapes.
    """
    changed = 0
    for module in model.modules():
        names = ("gate_proj", "up_proj", "down_proj")
        if not all(isinstance(getattr(module, name, None), torch.nn.Linear) for name in names):
            continue
        if any(getattr(module, name).bias is not None for name in names):
            continue
        pad = -module.gate_proj.out_features % multiple
        if pad == 0:
            continue
        module._curtail_mlp_pad = pad
        module.forward = types.MethodType(_padded_mlp_forward, module)
        changed += 1
    return changed


def _padded_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    pad = self._curtail_mlp_pad
    gate = project(self.gate_proj, x, F.pad(self.gate_proj.weight, (0, 0, 0, pad)))
    up = project(self.up_proj, x, F.pad(self.up_proj.weight, (0, 0, 0, pad)))
    return project(self.down_proj, self.act_fn(gate) * up, F.pad(self.down_proj.weight, (0, pad)))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 8192,
    compute_dtype: torch.dtype | None = None,
    compile_chunks: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` without holding the logits.

    The same function as ``F.cross_entropy((hidden @ weight.T).float(), labels)`` with the
    matmul in ``compute_dtype`` (as autocast would run it): the tokens are taken
    ``chunk_tokens`` at a time, and for each chunk the logits, the loss and the gradients of
    ``hidden`` and ``weight`` are computed in the forward pass (Liger-style), so memory holds
    one chunk of ``[chunk_tokens, vocab]`` logits instead of all of them, and the backward
    pass only scales the stored gradients. Labels equal to ``ignore_index`` carry no loss.

    Args:
        hidden: ``[tokens, width]`` final hidden states.
        weight: ``[vocab, width]`` LM-head weight.
        labels: ``[tokens]`` int64 targets.
        compute_dtype: matmul dtype (e.g. ``torch.bfloat16``); default ``weight``'s.
        compile_chunks: run the per-chunk softmax/gradient math through ``torch.compile``
            (one fused kernel instead of several passes over the chunk's logits).
    """
    return _LinearCrossEntropy.apply(
        hidden, weight, labels, chunk_tokens, compute_dtype or weight.dtype, compile_chunks, ignore_index
    )


def _chunk_loss_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of one chunk and d(mean loss)/d(logits), in the logits' dtype."""
    logits_f = logits.float()
    valid = labels != ignore_index
    targets = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits_f, dim=-1)
    target_logits = logits_f.gather(1, targets[:, None]).squeeze(1)
    loss_sum = torch.where(valid, lse - target_logits, torch.zeros_like(lse)).sum()
    probs = torch.exp(logits_f - lse[:, None])
    columns = torch.arange(logits.shape[1], device=logits.device)
    grad = torch.where(columns[None, :] == targets[:, None], probs - 1.0, probs)
    grad = grad * torch.where(valid, scale, torch.zeros_like(scale))[:, None]
    return loss_sum, grad.to(logits.dtype)


_compiled_chunk_loss_and_grad: Any = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_tokens: int,
        compute_dtype: torch.dtype,
        compile_chunks: bool,
        ignore_index: int,
    ) -> torch.Tensor:
        global _compiled_chunk_loss_and_grad
        chunk_fn = _chunk_loss_and_grad
        if compile_chunks:
            if _compiled_chunk_loss_and_grad is None:
                _compiled_chunk_loss_and_grad = torch.compile(_chunk_loss_and_grad, dynamic=False)
            chunk_fn = _compiled_chunk_loss_and_grad
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c = hidden.to(compute_dtype)
            weight_c = weight.to(compute_dtype)
            num_valid = (labels != ignore_index).sum().clamp_min(1)
            scale = (1.0 / num_valid.float()).to(torch.float32)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden_c)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for first in range(0, hidden_c.shape[0], chunk_tokens):
                rows = slice(first, first + chunk_tokens)
                chunk = hidden_c[rows]
                loss_sum, grad_logits = chunk_fn(chunk @ weight_c.T, labels[rows], scale, ignore_index)
                loss += loss_sum
                grad_hidden[rows] = grad_logits @ weight_c
                grad_weight += (grad_logits.T @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_output).to(ctx.hidden_dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None, None, None, None, None,
        )


#: Elements per device-to-host transfer (256M: 1 GiB of float32 staging at most).
_TRANSFER_NUMEL = 1 << 28


def _to_host_flat(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Tensors copied to new host numpy arrays (``dtype``; bf16 comes back as int16 bits),
    packed into a few large device-to-host transfers instead of one per tensor."""
    out: dict[str, np.ndarray] = {}
    group: list[tuple[str, torch.Tensor]] = []
    numel = 0

    def flush() -> None:
        if not group:
            return
        flat = torch.cat([tensor.reshape(-1).to(dtype) for _, tensor in group]).cpu()
        host = (flat.view(torch.int16) if dtype == torch.bfloat16 else flat).numpy()
        offset = 0
        for name, tensor in group:
            out[name] = host[offset : offset + tensor.numel()].reshape(tuple(tensor.shape))
            offset += tensor.numel()

    for name, tensor in tensors.items():
        if numel + tensor.numel() > _TRANSFER_NUMEL and group:
            flush()
            group, numel = [], 0
        group.append((name, tensor))
        numel += tensor.numel()
    flush()
    return out


def _to_cpu_copy(value: Any) -> Any:
    """Deep copy of nested dicts / lists with every tensor cloned onto the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu_copy(item) for item in value)
    return value
