"""Model presets: shapes, parameter counts, deterministic initialisation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from curtail.training.model import PRESETS, ModelSpec, build_model, count_parameters, get_spec

torch.set_num_threads(1)  # tiny models gain nothing from more; robust when the CPU is shared


def test_d20_has_about_561m_parameters() -> None:
    model = build_model("d20", device="meta")
    num_params = count_parameters(model)
    assert 560e6 <= num_params <= 562e6, num_params
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (20, 1280, 10)
    assert (config.intermediate_size, config.vocab_size) == (3413, 65_536)
    assert config.max_position_embeddings == 2048
    assert not config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_d12_is_gpt2_small_sized() -> None:
    model = build_model("d12", device="meta")
    assert 135.0e6 <= count_parameters(model) <= 135.5e6, count_parameters(model)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (2048, 32_768, 1024)


def test_d48_does_not_fit_one_80_gb_gpu_unsharded() -> None:
    model = build_model("d48", device="meta")
    num_params = count_parameters(model)
    assert 5.83e9 <= num_params <= 5.84e9, num_params
    assert num_params * 16 > 80e9  # fp32 weights, gradients and two AdamW moments
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (48, 3072, 8192)


def test_the_closed_form_parameter_count_is_the_built_models() -> None:
    grouped = ModelSpec(name="gqa", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                        intermediate_size=96, vocab_size=300, seq_len=16)
    tied = grouped.model_copy(update={"tie_embeddings": True})
    for spec in [*(preset() for preset in PRESETS.values()), grouped, tied]:
        assert spec.num_parameters() == count_parameters(build_model(spec, device="meta")), spec.name
    assert get_spec("d12").num_parameters(vocab_size=1000) == count_parameters(
        build_model("d12", vocab_size=1000, device="meta"))


def test_presets_are_frozen_specs() -> None:
    for name, preset in PRESETS.items():
        spec = preset()
        assert spec.name == name
        assert get_spec(name) == spec
        with pytest.raises(ValidationError, match="frozen"):
            spec.num_layers = 3  # type: ignore[misc]


def test_spec_rejects_bad_shapes_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelSpec(name="bad", num_layers=1, hidden_size=65, num_heads=4,
                  intermediate_size=8, vocab_size=300, seq_len=8)
    with pytest.raises(ValueError, match="extra"):
        ModelSpec(name="bad", num_layers=1, hidden_size=64, num_heads=4, intermediate_size=8,
                  vocab_size=300, seq_len=8, num_layer=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown model preset 'd21'"):
        get_spec("d21")


def test_build_model_is_deterministic_by_seed() -> None:
    first = build_model("tiny", vocab_size=300, seed=1)
    again = build_model("tiny", vocab_size=300, seed=1)
    other = build_model("tiny", vocab_size=300, seed=2)
    assert first.config.vocab_size == 300
    pairs = list(zip(first.state_dict().values(), again.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_forward_backward() -> None:
    spec = get_spec("tiny")
    model = build_model(spec)
    input_ids = torch.randint(0, spec.vocab_size, (4, spec.seq_len))
    logits = model(input_ids=input_ids).logits
    assert logits.shape == (4, spec.seq_len, spec.vocab_size)
    logits.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_causal_sdpa_is_the_same_function_as_masked_attention() -> None:
    """The training attention (SDPA, is_causal, no mask) against eager attention with an
    explicit causal mask: same logits, and changing a later token leaves earlier logits alone."""
    from curtail.training.model import CAUSAL_SDPA, use_causal_sdpa

    causal, eager = build_model("tiny", 300, seed=3), build_model("tiny", 300, seed=3)
    use_causal_sdpa(causal)
    eager.set_attn_implementation("eager")
    assert causal.config._attn_implementation == CAUSAL_SDPA
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(input_ids=tokens).logits
        got = causal(input_ids=tokens).logits
        changed = tokens.clone()
        changed[:, 30] = (changed[:, 30] + 1) % 300
        later = causal(input_ids=changed).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(later[:, :30], got[:, :30])
    assert not torch.allclose(later[:, 30:], got[:, 30:])
