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

:func:`cast_traffic_bytes` is the memory traffic the float8 casts of one training step add, by
torchao's roofline model (``torchao/testing/training/roofline_utils.py``): the floor under the
time those casts cost on a GPU, whose matmuls they feed (the benchmark compares it with the
profiled cost).

Needs torchao (``pip install 'curtail[fp8]'``). It also runs on CPUs (``_scaled_mm`` has a
CPU kernel), which the tests use; it only pays on GPUs with float8 tensor cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FLOAT8_MULTIPLE = 16  # torch._scaled_mm: both dimensions of each operand divisible by 16
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections of one tensor
NORM_FED = frozenset(name for group in SHARED_INPUTS for name in group)  # their input is the RMSNorm's output
ACTIVATION_BYTES = 2  # activations and gradients reach the casts in bf16 (autocast; see norm_output_bytes)


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


def cast_traffic_bytes(model: torch.nn.Module, tokens: int, recipe: str = "tensorwise", *,
                       weight_bytes: int = 4, norm_output_bytes: int = ACTIVATION_BYTES,
                       fused_with_producer: bool = False, shared_inputs_once: bool = False) -> int:
    """Bytes the float8 casts of one forward + backward over ``tokens`` tokens read and write
    from GPU memory, for the layers :func:`convert_linears` converted in ``model``.

    torchao's roofline model, per converted layer with input ``[tokens, K]``, weight ``[N, K]``
    and output gradient ``[tokens, N]`` (widths as the padded MLP computes them): each
    activation and output gradient is read for its scale (amax; nothing if ``fused_with_producer``:
    the kernel that wrote it also reduces it), then read again and written in float8 in the
    layouts the forward and backward matmuls need; the weight (``weight_bytes`` per element:
    4 for float32 master weights under autocast, 2 for bf16 ones) likewise, once per
    forward/backward. ``norm_output_bytes`` is the element size of the inputs the RMSNorm feeds
    (q/k/v's and gate/up's): 4 where autocast leaves the norm's output in float32 (float32 weights
    and residual stream, as under DDP), 2 where the model computes in bf16. ``shared_inputs_once``
    counts an input several projections share (q, k, v; gate, up) once, as a compiled graph that
    merges their identical casts computes it.
    """
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"fp8_recipe {recipe!r}: use one of {', '.join(FLOAT8_RECIPES)}")
    if tokens <= 0 or weight_bytes <= 0:
        raise ValueError(f"tokens and weight_bytes must be > 0, got {tokens} and {weight_bytes}")
    act, wgt = _activation_cast_bytes(recipe, fused_with_producer), _weight_cast_bytes(recipe, weight_bytes)
    norm_fed = _activation_cast_bytes(recipe, fused_with_producer, norm_output_bytes)
    total = 0
    for parent_name, parent in model.named_modules():
        pad = _mlp_pad(parent)
        converted = {name: child for name, child in parent.named_children() if is_float8(child)}
        input_cast_by = {name: group[0] for group in SHARED_INPUTS for name in group
                         if shared_inputs_once and all(member in converted for member in group)}
        for name, layer in converted.items():
            out_features, in_features = _computed_shape(layer, name, pad)
            if input_cast_by.get(name, name) == name:
                total += (norm_fed if name in NORM_FED else act) * tokens * in_features
            total += act * tokens * out_features + wgt * out_features * in_features
    return total


def _activation_cast_bytes(recipe: str, fused_with_producer: bool, element_bytes: int = ACTIVATION_BYTES) -> int:
    """Bytes per element of an activation (or output gradient) of ``element_bytes`` each, cast for
    both matmuls."""
    amax = 0 if fused_with_producer else element_bytes
    if recipe == "tensorwise":  # amax; then read once, write two float8 layouts
        return amax + element_bytes + 2
    if recipe == "rowwise":  # per-row scales: cast + bf16 transpose, then the transposed cast
        return amax + 1 + element_bytes + ACTIVATION_BYTES + 1
    return amax + 1  # rowwise_with_gw_hp: one float8 layout; the weight gradient's matmul is bf16


def _weight_cast_bytes(recipe: str, weight_bytes: int) -> int:
    """Bytes per weight element cast for the forward and the backward matmul."""
    if recipe == "tensorwise":  # amax, then a cast per pass
        return weight_bytes + 2 * (weight_bytes + 1)
    if recipe == "rowwise":  # cast, transpose, transposed cast
        return (weight_bytes + 1) + 2 * weight_bytes + (weight_bytes + 1)
    return 2 * (weight_bytes + 1)


def _eligible_names(model: torch.nn.Module) -> list[str]:
    """Linear layers of the decoder blocks whose matmul shapes ``_scaled_mm`` accepts."""
    names = []
    for parent_name, parent in model.named_modules():
        pad = _mlp_pad(parent)
        for child_name, child in parent.named_children():
            if not isinstance(child, torch.nn.Linear) or child.bias is not None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not _in_decoder_block(name):
                continue
            out_features, in_features = _computed_shape(child, child_name, pad)
            if out_features % FLOAT8_MULTIPLE == 0 and in_features % FLOAT8_MULTIPLE == 0:
                names.append(name)
    return names


def _mlp_pad(module: torch.nn.Module) -> int:
    """Units :func:`~curtail.training.loop.pad_mlp_width` adds to this module's MLP (0: none)."""
    return int(getattr(module, "_curtail_mlp_pad", 0))


def _computed_shape(layer: torch.nn.Linear, name: str, pad: int) -> tuple[int, int]:
    """``(out_features, in_features)`` of ``layer`` (named ``name`` in its parent) as the padded
    MLP computes it: gate and up ``pad`` rows wider, down ``pad`` columns."""
    gate, up, down = MLP_PROJECTIONS
    if name in (gate, up):
        return layer.out_features + pad, layer.in_features
    if name == down:
        return layer.out_features, layer.in_features + pad
    return layer.out_features, layer.in_features


def _in_decoder_block(name: str) -> bool:
    parts = name.split(".")
    return "layers" in parts and parts[-1] != "lm_head"
