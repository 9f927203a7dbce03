"""Float8 training of the linear layers (torchao, on CPUs: torch._scaled_mm has a CPU kernel)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from curtail.config import load_experiment
from curtail.errors import PreflightError
from curtail.training.loop import SiteTrainer

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "data" / "text" / "tinyshakespeare.txt"


def batches(count: int, rows: int = 4, seq: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of real text, one token per byte."""
    data = np.frombuffer(TEXT.read_bytes()[: count * rows * seq + 1], dtype=np.uint8).astype(np.int64)
    out = []
    for step in range(count):
        window = torch.from_numpy(data[step * rows * seq :][: rows * seq + 1])
        out.append((window[:-1].view(rows, seq), window[1:].view(rows, seq)))
    return out


def scaled_matmuls(trainer: SiteTrainer, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """How many float8 matmuls one training step runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(inputs, labels, lr=1e-3)
    return sum(event.count for event in prof.key_averages() if event.key == "aten::_scaled_mm")


def test_fp8_converts_every_decoder_linear_including_the_padded_mlp_and_keeps_the_lm_head() -> None:
    trainer = SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu", fp8_linear=True)
    assert trainer.pad_mlp_multiple == 64  # tiny's MLP (172) is widened to 192 so it qualifies
    layers = trainer.spec.num_layers
    assert len(trainer.float8_layers) == 7 * layers  # q, k, v, o, gate, up, down
    assert not any("lm_head" in name or "embed" in name for name in trainer.float8_layers)
    inputs, labels = batches(1)[0]
    # forward 1 + backward 2 matmuls per converted layer: the padded MLP runs in float8 too
    assert scaled_matmuls(trainer, inputs, labels) == 3 * 7 * layers
    plain = SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu")
    assert scaled_matmuls(plain, inputs, labels) == 0


def test_every_scaling_recipe_trains_and_an_unknown_one_is_refused_by_name() -> None:
    inputs, labels = batches(1)[0]
    scales = set()
    for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
        trainer = SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu", fp8_linear=True, fp8_recipe=recipe)
        layer = trainer.model.model.layers[0].self_attn.q_proj
        scales.add(str(layer.config.cast_config_input.scaling_granularity))
        assert np.isfinite(trainer.train_step(inputs, labels, lr=1e-3))
    assert len(scales) == 2  # per tensor, per row
    with pytest.raises(ValueError, match="fp8_recipe 'rowise': use one of tensorwise, rowwise"):
        SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu", fp8_linear=True, fp8_recipe="rowise")


def test_fp8_weights_keep_their_names_shapes_and_values_for_the_averager() -> None:
    plain = SiteTrainer("tiny", vocab_size=256, seed=3, device="cpu", pad_mlp_multiple=64)
    fp8 = SiteTrainer("tiny", vocab_size=256, seed=3, device="cpu", fp8_linear=True)
    exported, exported_fp8 = plain.export_params(), fp8.export_params()
    assert exported.keys() == exported_fp8.keys()
    for name, array in exported.items():
        assert exported_fp8[name].dtype == np.float32 and np.array_equal(exported_fp8[name], array), name
    fp8.load_global(exported)  # the averager's global weights load as before


def test_fp8_training_follows_the_full_precision_loss_on_real_text() -> None:
    data = batches(25)
    losses = {}
    for fp8 in (False, True):
        trainer = SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu", pad_mlp_multiple=64, fp8_linear=fp8)
        losses[fp8] = [trainer.train_step(inputs, labels, lr=3e-3) for inputs, labels in data]
    assert losses[True][-1] < losses[True][0] - 1.0  # it learns
    tail = [np.mean(losses[fp8][-5:]) for fp8 in (False, True)]
    assert abs(tail[1] / tail[0] - 1) < 0.02, tail
    assert losses[True] != losses[False]  # the float8 path really ran


def test_fp8_is_wired_from_the_config_to_the_site_trainer() -> None:
    from test_site_worker import make_config

    from curtail.runtime.sites import site_trainer

    config = dataclasses.replace(make_config(), fp8_linear=True, fp8_recipe="rowwise")
    trainer = site_trainer(config, torch.device("cpu"))
    assert len(trainer.float8_layers) == 14
    assert "AXISWISE" in str(trainer.model.model.layers[1].mlp.down_proj.config.cast_config_weight.scaling_granularity)
    experiment = load_experiment(REPO / "experiments" / "demo.toml")
    changed = experiment.replace(training=experiment.training.replace(fp8_linear=True))
    assert changed.training.fp8_linear and not experiment.training.fp8_linear


def test_fp8_without_torchao_is_a_preflight_error_that_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from curtail.preflight import check_run_files

    experiment = load_experiment(REPO / "experiments" / "demo.toml")
    experiment = experiment.replace(training=experiment.training.replace(fp8_linear=True))
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(PreflightError, match=r"training.fp8_linear: .*pip install 'curtail\[fp8\]'"):
        check_run_files(experiment)


def test_cast_traffic_counts_every_converted_layer_at_its_padded_width() -> None:
    from curtail.training.float8 import cast_traffic_bytes

    trainer = SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu", fp8_linear=True)
    tokens, layers = 1000, trainer.spec.num_layers  # width 64, the MLP padded from 172 to 192
    weights = 4 * 64 * 64 + 2 * 192 * 64 + 192 * 64
    # each cast: input and output gradient 6 bytes per element (amax, read, two float8
    # layouts); the float32 weight 4 + 2·(4 + 1)
    activations = 4 * (64 + 64) + 2 * (64 + 192) + (192 + 64)
    assert cast_traffic_bytes(trainer.model, tokens) == layers * (6 * activations * tokens + 14 * weights)
    # amax fused into the producer (4 bytes), q/k/v's and gate/up's shared input cast once
    once = (64 + 64 + 64 + 192) + (4 * 64 + 2 * 192 + 64)
    assert cast_traffic_bytes(trainer.model, tokens, fused_with_producer=True, shared_inputs_once=True) == \
        layers * (4 * once * tokens + 14 * weights)
    bf16_weights = cast_traffic_bytes(trainer.model, tokens, weight_bytes=2)
    assert bf16_weights == layers * (6 * activations * tokens + 8 * weights)
    # the norm's output in float32 (autocast over float32): q/k/v's and gate/up's inputs read at
    # 4 bytes (amax, cast) instead of 2
    fp32_norm = cast_traffic_bytes(trainer.model, tokens, norm_output_bytes=4)
    assert fp32_norm - cast_traffic_bytes(trainer.model, tokens) == layers * 4 * (5 * 64) * tokens
    fp32_norm_fused = cast_traffic_bytes(trainer.model, tokens, norm_output_bytes=4, fused_with_producer=True,
                                         shared_inputs_once=True)
    assert fp32_norm_fused == layers * (4 * once * tokens + 2 * (64 + 64) * tokens + 14 * weights)
    by_recipe = {recipe: cast_traffic_bytes(trainer.model, tokens, recipe)
                 for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp")}
    assert by_recipe["rowwise_with_gw_hp"] < by_recipe["tensorwise"] < by_recipe["rowwise"]
    assert cast_traffic_bytes(SiteTrainer("tiny", vocab_size=256, device="cpu").model, tokens) == 0
    with pytest.raises(ValueError, match="fp8_recipe 'blockwise'"):
        cast_traffic_bytes(trainer.model, tokens, "blockwise")
