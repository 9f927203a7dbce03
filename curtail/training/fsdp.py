"""FSDP2 inside a site: each rank holds a dim-0 shard of every parameter, its gradients and its
AdamW moments (``parallelism = "fsdp"``; "ddp" keeps a whole replica per rank).

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer and then
to the whole model (the embedding, the final norm and the LM head form the root group), over the
site's process group: NCCL on GPUs, gloo on CPUs. With a ``param_dtype`` (e.g. bf16) the layers
compute in it and reduce gradients in float32 while the sharded master weights and the optimizer
stay float32 (``MixedPrecisionPolicy``).

FSDP2 splits each parameter with ``torch.chunk(dim=0)`` over the ranks: rank ``r`` of ``w``
holds rows :func:`shard_rows` of the full tensor (possibly none, for a tensor with fewer rows
than ranks). The site trainer reads and writes weights through these local rows only
(:func:`local`): a rank loads its rows of the global weights, computes its rows of the
pseudo-gradient and merges its rows of an arrival, so no rank ever holds the whole model on its
device.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist


def shard_model(model: torch.nn.Module, group: dist.ProcessGroup | None, device: torch.device,
                param_dtype: torch.dtype | None = None) -> None:
    """Shard ``model`` (a ``LlamaForCausalLM``) in place over ``group``'s ranks (see the module doc)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError('parallelism = "fsdp" needs torch.distributed initialised (a Ray Train worker group, or '
                           'torch.distributed.init_process_group); use "ddp" for a trainer on its own')
    mesh = DeviceMesh.from_group(group or dist.group.WORLD, device.type)
    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
              if param_dtype is not None else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def route_through_root(model: torch.nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(input_ids, labels)`` computed from inside ``model``'s own call; returns the function
    to call instead.

    The fused LM head + cross-entropy reads ``lm_head.weight`` (and the body the embeddings)
    outside ``model.forward``. Under FSDP2 those belong to the root's parameter group, which is
    gathered only around a call of the root (its pre-forward hook), and whose gradients are
    reduce-scattered only after a backward through such a call. The model's ``forward`` takes an
    extra keyword, ``fused_loss_labels``: with it, the call returns the loss; without it (the
    evaluation, export) it is the model's own forward.
    """
    plain = model.forward

    def forward(self: torch.nn.Module, *args: Any, fused_loss_labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if fused_loss_labels is None:
            return plain(*args, **kwargs)
        return loss(kwargs["input_ids"], fused_loss_labels)

    model.forward = types.MethodType(forward, model)
    return lambda input_ids, labels: model(input_ids=input_ids, fused_loss_labels=labels)


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local(param: torch.Tensor) -> torch.Tensor:
    """The rows of ``param`` this rank holds (a view: writing it writes the parameter); the tensor
    itself when it is not sharded."""
    return param.to_local() if is_sharded(param) else param


def shard_rows(param: torch.Tensor) -> slice:
    """The rows of the full tensor that :func:`local` holds on this rank (``torch.chunk`` over the mesh)."""
    if not is_sharded(param):
        return slice(None)
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    rows = param.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return slice(start, min(start + chunk, rows))


def optimizer_state_to_local(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with every DTensor replaced by this rank's local tensor (a file
    per rank holds its own shard; :func:`optimizer_state_from_local` puts it back)."""
    def convert(value: Any) -> Any:
        if is_sharded(value):
            return value.to_local()
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        return value

    return convert(dict(state))


def optimizer_state_from_local(state: Mapping[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_local` for an optimizer over ``params`` (in the
    optimizer's order): each parameter's per-element state becomes a DTensor laid out like it."""
    from torch.distributed.tensor import DTensor

    restored = dict(state)
    restored["state"] = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        restored["state"][index] = {
            key: DTensor.from_local(value.to(local(param).device), param.device_mesh, param.placements,
                                    shape=param.shape, stride=param.stride())
            if is_sharded(param) and isinstance(value, torch.Tensor) and value.ndim > 0 else value
            for key, value in entry.items()
        }
    return restored
