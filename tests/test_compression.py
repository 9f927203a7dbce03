"""Pseudo-gradients on the wire: codec error bounds, bytes, top-k, error feedback and its
checkpointing with the site's optimizer state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from curtail.config import TrainingConfig
from curtail.training.compression import (
    ErrorFeedback,
    WireFormat,
    compress,
    decompress,
    encode,
    entropy_code,
)
from curtail.training.loop import SiteTrainer

torch.set_num_threads(1)


@pytest.fixture
def delta() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {  # heavy-tailed like pseudo-gradients; an odd length; a tensor of zeros; an empty one
        "w": (rng.standard_t(5, size=(256, 96)) * 1e-3).astype(np.float32),
        "b": rng.standard_normal(37).astype(np.float32),
        "zeros": np.zeros((3, 5), np.float32),
        "empty": np.zeros(0, np.float32),
    }


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_blockwise_quantisation_errs_at_most_half_a_step_per_block(delta, codec) -> None:
    wire = WireFormat(codec, block_size=64)
    packed = compress(delta, wire)
    restored = decompress(packed)
    q_max = {"int8": 127, "int4": 7}[codec]
    for name, original in delta.items():
        assert restored[name].shape == original.shape and restored[name].dtype == np.float32
        flat, back = original.reshape(-1), restored[name].reshape(-1)
        for start in range(0, flat.size, 64):
            block = flat[start:start + 64]
            step = np.abs(block).max() / q_max
            assert np.all(np.abs(back[start:start + 64] - block) <= step / 2 * (1 + 1e-5) + 1e-12)
    np.testing.assert_array_equal(restored["zeros"], delta["zeros"])


def test_bytes_on_the_wire_against_bf16(delta) -> None:
    bf16 = compress(delta, "bf16").num_bytes
    assert bf16 == sum(a.size for a in delta.values()) * 2
    assert compress(delta, "fp32").num_bytes == 2 * bf16
    assert compress(delta, "int8").num_bytes <= 0.55 * bf16
    assert compress(delta, "int4").num_bytes <= 0.25 * bf16  # 4-bit codes, zstd-coded, with their scales
    assert compress(delta, WireFormat("int4", topk_fraction=0.03)).num_bytes <= bf16 / 16
    assert compress(delta, WireFormat("int8", topk_fraction=0.01)).num_bytes <= bf16 / 16


@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8"])
def test_top_k_sends_the_largest_values_and_zeros_the_rest(delta, codec) -> None:
    wire = WireFormat(codec, topk_fraction=0.05)
    restored = decompress(compress(delta, wire))
    for name, original in delta.items():
        flat = original.reshape(-1)
        kept = np.flatnonzero(restored[name].reshape(-1))
        keep = min(flat.size, max(1, math.ceil(0.05 * flat.size))) if flat.size else 0
        if not np.any(flat):
            continue
        assert len(kept) <= keep
        threshold = np.sort(np.abs(flat))[-keep]
        assert np.all(np.abs(flat[kept]) >= threshold * (1 - 1e-6))
        if codec == "fp32":
            np.testing.assert_array_equal(restored[name].reshape(-1)[kept], flat[kept])


def test_error_feedback_delivers_every_part_of_the_updates_eventually() -> None:
    """Σ sent + residual = Σ pseudo-gradients, round after round; without feedback the gap grows."""
    rng = np.random.default_rng(1)
    wire = WireFormat("int4", topk_fraction=0.05, block_size=32)
    feedback, plain = ErrorFeedback(), ErrorFeedback()
    total = np.zeros((64, 48), np.float32)
    sent_fed, sent_plain = np.zeros_like(total), np.zeros_like(total)
    for _ in range(30):
        g = rng.standard_normal(total.shape).astype(np.float32)
        total += g
        sent_fed += decompress(feedback.pack({"w": torch.from_numpy(g.copy())}, wire))["w"]
        sent_plain += decompress(plain.pack({"w": torch.from_numpy(g.copy())}, WireFormat(
            "int4", topk_fraction=0.05, block_size=32, error_feedback=False)))["w"]
    np.testing.assert_allclose(sent_fed + feedback.residual["w"].numpy(), total, atol=1e-3)
    assert not plain.residual
    fed_gap, plain_gap = np.linalg.norm(total - sent_fed), np.linalg.norm(total - sent_plain)
    assert fed_gap < 0.5 * plain_gap, (fed_gap, plain_gap)  # measured: 96 vs 256


def test_chunked_top_k_keeps_the_largest_values_of_every_chunk() -> None:
    flat = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    flat[:4096] *= 100  # one loud chunk: whole-tensor top-k would take all its values from it
    wire = WireFormat("fp32", topk_fraction=0.03, topk_chunk=4096)
    restored = decompress(compress({"w": flat}, wire))["w"]
    for start in (0, 4096, 8192):
        chunk, kept = flat[start:start + 4096], np.flatnonzero(restored[start:start + 4096])
        assert len(kept) == math.ceil(0.03 * 4096)  # 123 from each chunk, the short last one too
        assert np.abs(chunk[kept]).min() >= np.sort(np.abs(chunk))[-len(kept)]
        np.testing.assert_array_equal(restored[start:start + 4096][kept], chunk[kept])
    whole = decompress(compress({"w": flat}, WireFormat("fp32", topk_fraction=0.03)))["w"]
    assert np.flatnonzero(whole).max() < 4096


def test_a_decayed_residual_carries_beta_times_what_was_not_sent() -> None:
    """C(g + β·e): with β = 0.5 the second round packs g₂ + e₁/2."""
    rng = np.random.default_rng(3)
    g1, g2 = (rng.standard_normal(4096).astype(np.float32) for _ in range(2))
    wire = WireFormat("fp32", topk_fraction=0.1, error_feedback_decay=0.5)
    feedback = ErrorFeedback()
    sent1 = decompress(feedback.pack({"w": torch.from_numpy(g1.copy())}, wire))["w"]
    np.testing.assert_allclose(feedback.residual["w"].numpy(), g1 - sent1)
    sent2 = decompress(feedback.pack({"w": torch.from_numpy(g2.copy())}, wire))["w"]
    np.testing.assert_allclose(sent2 + feedback.residual["w"].numpy(), g2 + 0.5 * (g1 - sent1), rtol=1e-6)
    with pytest.raises(ValueError, match="error_feedback_decay"):
        WireFormat("int4", error_feedback_decay=0.0)
    with pytest.raises(ValueError, match="transfer_topk_chunk"):
        WireFormat("int4", topk_chunk=4096)  # no top-k to chunk


def test_lossless_and_plain_bf16_keep_no_residual() -> None:
    for wire in (WireFormat("fp32"), WireFormat("bf16")):
        feedback = ErrorFeedback()
        feedback.pack({"w": torch.ones(8)}, wire)
        assert not wire.keeps_residual and feedback.residual == {}
    assert WireFormat("bf16", topk_fraction=0.1).keeps_residual and WireFormat("int8").keeps_residual


def test_encode_returns_what_the_receiver_decodes(delta) -> None:
    tensors = {name: torch.from_numpy(array.copy()) for name, array in delta.items()}
    for wire in (WireFormat("int4"), WireFormat("int8", topk_fraction=0.1), WireFormat("bf16")):
        packed, decoded = encode(tensors, wire)
        for name, array in decompress(packed).items():
            np.testing.assert_array_equal(decoded[name].numpy(), array)


def test_the_residual_is_saved_and_restored_with_the_inner_optimizer() -> None:
    """A resumed site sends what the uninterrupted one would have: the residual is part of the
    optimizer state every checkpoint path writes (window drains, run checkpoints, resume)."""
    wire = WireFormat("int4", topk_fraction=0.1)
    first = SiteTrainer("tiny", vocab_size=64, seed=0, device="cpu")
    reference = first.export_params()
    ids = torch.randint(0, 64, (2, 16))
    first.train_step(ids, ids, lr=1e-2)
    first.compressed_pseudo_gradient(reference, wire)  # round 1: leaves a residual
    assert first.error_feedback.norm > 0
    buffer = io.BytesIO()
    torch.save(first.optimizer_state_dict(), buffer)
    resumed = SiteTrainer("tiny", vocab_size=64, seed=0, device="cpu")
    resumed.load_global(first.export_params())
    resumed.load_optimizer_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert resumed.error_feedback.norm == pytest.approx(first.error_feedback.norm)
    reference = first.export_params()
    for trainer in (first, resumed):
        trainer.train_step(ids, ids, lr=1e-2)
    a = decompress(first.compressed_pseudo_gradient(reference, wire))
    b = decompress(resumed.compressed_pseudo_gradient(reference, wire))
    assert all(np.array_equal(a[name], b[name]) for name in a)
    fresh = SiteTrainer("tiny", vocab_size=64, seed=0, device="cpu")  # a killed site's replacement
    assert fresh.error_feedback.norm == 0.0


@pytest.mark.parametrize("wire", [WireFormat("int4"), WireFormat("int8", topk_fraction=0.1)])
def test_raw_codes_framed_later_decode_the_same(delta, wire) -> None:
    """encode(frame=False) leaves the Zstandard framing to a transfer thread (entropy_code):
    the bytes are the framed encoding's and every form decodes to the same values."""
    tensors = {name: torch.from_numpy(array) for name, array in delta.items()}
    framed, _ = encode(tensors, wire)
    raw, _ = encode(tensors, wire, frame=False)
    coded = entropy_code(raw)
    assert not raw.coded and coded.coded and coded.num_bytes == framed.num_bytes < raw.num_bytes
    for name, array in decompress(framed).items():
        np.testing.assert_array_equal(decompress(raw)[name], array)
        np.testing.assert_array_equal(decompress(coded)[name], array)


def test_a_chunk_without_top_k_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="transfer_topk_chunk needs transfer_topk_fraction"):
        TrainingConfig(transfer_dtype="int4", transfer_topk_chunk=4096)
    with pytest.raises(ValidationError, match="error_feedback_decay"):
        TrainingConfig(error_feedback_decay=1.5)


def test_wire_format_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="unknown transfer dtype 'int3'"):
        WireFormat("int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transfer_topk_fraction"):
        WireFormat("int8", topk_fraction=0.0)
    with pytest.raises(ValueError, match="transfer_block_size"):
        WireFormat("int8", block_size=63)
    with pytest.raises(ValidationError, match="transfer_dtype"):
        TrainingConfig(transfer_dtype="int2")
    with pytest.raises(ValidationError, match="transfer_topk_fraction"):
        TrainingConfig(transfer_topk_fraction=1.5)
    with pytest.raises(ValidationError, match="transfer_block_size"):
        TrainingConfig(transfer_block_size=7)
    with pytest.raises(ValidationError, match="broadcast_dtype"):
        TrainingConfig(broadcast_dtype="int2")
