"""Float8 training of the decoder's linear layers: an opt-in speed path for Hopper-class GPUs.

:func:`convert_linears` swaps each linear layer of the decoder blocks for torchao's
``Float8Linear`` (dynamic per-tensor scaling: activations and weights cast to e4m3, gradients to
e5m2, every matmul through ``torch._scaled_mm``). The float32 master weights, the AdamW state,
the parameter names and shapes stay as they are, so checkpoints, export, pseudo-gradients and
the averager see nothing of it. The LM head stays in bf16 (its logits feed the loss directly,
the usual float8 recipe), as do the embeddings and norms.

The scaling recipe (``FLOAT8_RECIPES``, torchao's names): ``tensorwise`` (one scale per tensor,
the fastest), ``rowwise`` (one per row: more accurate, more scaling work) and
``rowwise_with_gw_hp`` (rowwise, with the weight gradient's matmul kept in high precision).

``torch._scaled_mm`` needs both matrix dimensions divisible by 16: a layer whose shape is not
(after the padded-MLP widening of :func:`curtail.training.loop.pad_mlp_width`) stays in bf16.
:func:`project` computes a projection with a weight other than the module's own (the padded
MLP's zero-padded weights) the way the module would: in float8 when it was converted.

Needs torchao (``pip install 'curtail[fp8]'``). It also runs on CPUs (``_scaled_mm`` has a
CPU kernel), which the tests use; it only pays on GPUs with float8 tensor cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FLOAT8_MULTIPLE = 16  # torch._scaled_mm: both dimensions of each operand divisible by 16
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def require_torchao() -> None:
    """Raise a message that says how to get torchao when it is missing."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as missing:
        raise ImportError("fp8_linear = true needs torchao: pip install 'curtail[fp8]' "
                          f"(or set fp8_linear = false) ({missing})") from missing


def convert_linears(model: torch.nn.Module, recipe: str = "tensorwise") -> list[str]:
    """Make the decoder blocks' linear layers train in float8 with the scaling ``recipe``;
    returns the converted names.

    Call after :func:`~curtail.training.loop.pad_mlp_width` (a padded MLP's projections are
    judged by the widths they compute at) and before sharding and compiling.
    """
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"fp8_recipe {recipe!r}: use one of {', '.join(FLOAT8_RECIPES)}")
    require_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    eligible = set(_eligible_names(model))
    if not eligible:
        raise ValueError("fp8_linear: no linear layer of this model has dimensions divisible by "
                         f"{FLOAT8_MULTIPLE} (pad_mlp_multiple pads the MLP's); use a larger preset or fp8_linear = false")
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda _, name: name in eligible)
    return sorted(eligible)


def is_float8(module: torch.nn.Module) -> bool:
    """Whether :func:`convert_linears` converted ``module``."""
    return type(module).__name__ == "Float8Linear" and hasattr(module, "linear_mm_config")


def project(module: torch.nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` the way ``module`` computes its own weight: float8 if it was converted."""
    if not is_float8(module):
        return F.linear(x, weight)
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    if torch.is_autocast_enabled():  # as Float8Linear.forward: the output in the autocast dtype
        x = x.to(torch.get_autocast_gpu_dtype())
    return matmul_with_hp_or_float8_args.apply(x, weight.t(), module.linear_mm_config, module.config)


def _eligible_names(model: torch.nn.Module) -> list[str]:
    """Linear layers of the decoder blocks whose matmul shapes ``_scaled_mm`` accepts."""
    names = []
    for parent_name, parent in model.named_modules():
        pad = int(getattr(parent, "_curtail_mlp_pad", 0))
        for child_name, child in parent.named_children():
            if not isinstance(child, torch.nn.Linear) or child.bias is not None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not _in_decoder_block(name):
                continue
            out_features, in_features = child.out_features, child.in_features
            if pad and child_name in ("gate_proj", "up_proj"):
                out_features += pad
            elif pad and child_name == "down_proj":
                in_features += pad
            if out_features % FLOAT8_MULTIPLE == 0 and in_features % FLOAT8_MULTIPLE == 0:
                names.append(name)
    return names


def _in_decoder_block(name: str) -> bool:
    parts = name.split(".")
    return "layers" in parts and parts[-1] != "lm_head"
