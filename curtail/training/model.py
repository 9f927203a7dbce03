"""Model presets: the Llama-style decoder a run trains, from a CPU-test size up to the paper's d20.

A :class:`ModelSpec` is a frozen, validated description (layers, width, heads, MLP width,
vocabulary, sequence length); :func:`build_model` turns it into a
``transformers.LlamaForCausalLM`` with a deterministic initialisation for a given seed, so
every site that builds the same spec with the same seed starts from identical weights.

Presets (functions, plus the :data:`PRESETS` registry):

- ``tiny``  — 2 layers, width 64: tests; a training step takes milliseconds on a CPU.
- ``small`` — 4 layers, width 192: the CPU demo; the loss falls visibly within minutes.
- ``d12``   — 12 layers, width 768, 12 heads, vocab 32,768, sequence 1,024, untied
  embeddings: ≈135M parameters, the GPU quality runs (trains at hundreds of thousands of
  tokens/s on one H200).
- ``d20``   — 20 layers, width 1280, 10 heads, vocab 65,536, sequence 2,048, untied
  embeddings: ≈561M parameters, the model of the prior system's report.
- ``d48``   — 48 layers, width 3072, 24 heads, the same vocabulary and sequence: ≈5.8B
  parameters, for FSDP sites (``parallelism = "fsdp"``); too large for one 80-GB GPU.

Example::

    model = build_model("tiny", vocab_size=len(tokenizer), seed=0)
    count_parameters(model)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import LlamaConfig, LlamaForCausalLM


class ModelSpec(BaseModel):
    """Shape of a Llama-style decoder. Frozen; unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0, description="model width (embedding dimension)")
    num_heads: int = Field(gt=0, description="attention heads; hidden_size must divide evenly")
    num_kv_heads: int | None = Field(default=None, gt=0, description="None: same as num_heads")
    intermediate_size: int = Field(gt=0, description="SwiGLU MLP width")
    vocab_size: int = Field(gt=0, description="default vocabulary; a tokenizer may override it")
    seq_len: int = Field(gt=0, description="training context length in tokens")
    tie_embeddings: bool = False
    rope_theta: float = Field(default=10_000.0, gt=0)
    init_std: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}; pick a head count that divides the width"
            )
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {kv_heads}"
            )
        return self

    @property
    def num_parameter_tensors(self) -> int:
        """Named parameter tensors of the model: the embedding, 9 per decoder layer (4 attention
        projections, 3 MLP projections, 2 norms), the final norm, and the LM head unless tied."""
        return 1 + 9 * self.num_layers + 1 + (0 if self.tie_embeddings else 1)

    def num_parameters(self, vocab_size: int | None = None) -> int:
        """Parameters of the model at ``vocab_size`` (default the spec's), without building it."""
        kv_width = (self.num_kv_heads or self.num_heads) * (self.hidden_size // self.num_heads)
        attention = 2 * self.hidden_size * (self.hidden_size + kv_width)  # q, o; k, v
        layer = attention + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size
        embeddings = (vocab_size or self.vocab_size) * self.hidden_size * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * layer + self.hidden_size

    def llama_config(self, vocab_size: int | None = None) -> LlamaConfig:
        """The ``transformers`` config for this spec (``vocab_size`` overrides the spec's)."""
        return LlamaConfig(
            vocab_size=vocab_size or self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=self.tie_embeddings,
            rope_theta=self.rope_theta,
            initializer_range=self.init_std,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


def tiny() -> ModelSpec:
    """Test model (≈0.16M parameters at vocab 512): a step takes milliseconds on a CPU."""
    return ModelSpec(
        name="tiny", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=172,
        vocab_size=512, seq_len=64,
    )


def small() -> ModelSpec:
    """CPU demo model (≈2.6M parameters at vocab 2,048): learns visibly in a few minutes."""
    return ModelSpec(
        name="small", num_layers=4, hidden_size=192, num_heads=4, intermediate_size=512,
        vocab_size=2048, seq_len=128,
    )


def d12() -> ModelSpec:
    """A GPT-2-small-sized model: 12 layers, width 768, 12 heads, ≈135M parameters at vocab 32,768."""
    return ModelSpec(
        name="d12", num_layers=12, hidden_size=768, num_heads=12, intermediate_size=2048,
        vocab_size=32_768, seq_len=1024,
    )


def d20() -> ModelSpec:
    """The prior system's model: 20 layers, width 1280, 10 heads, ≈561M parameters."""
    return ModelSpec(
        name="d20", num_layers=20, hidden_size=1280, num_heads=10, intermediate_size=3413,
        vocab_size=65_536, seq_len=2048,
    )


def d48() -> ModelSpec:
    """A model for sharded sites: 48 layers, width 3072, 24 heads, ≈5.8B parameters. Its weights,
    gradients and AdamW moments (16 bytes per parameter, 93 GB) do not fit one 80-GB GPU, so it
    trains with ``parallelism = "fsdp"`` over two or more of them (or on one 141-GB H200)."""
    return ModelSpec(
        name="d48", num_layers=48, hidden_size=3072, num_heads=24, intermediate_size=8192,
        vocab_size=65_536, seq_len=2048,
    )


PRESETS: dict[str, Callable[[], ModelSpec]] = {"tiny": tiny, "small": small, "d12": d12, "d20": d20, "d48": d48}


def get_spec(preset: str | ModelSpec) -> ModelSpec:
    """A preset by name (``"tiny"``, ``"small"``, ``"d20"``, ``"d48"``), or the spec itself."""
    if isinstance(preset, ModelSpec):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]()


def build_model(
    preset: str | ModelSpec,
    vocab_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """A freshly initialised fp32 model; the same (spec, vocab_size, seed) gives the same weights.

    Weights are always initialised on the CPU (so a GPU site and a CPU test agree) and then
    moved to ``device``; ``device="meta"`` builds shapes only, allocating nothing (for
    counting parameters of large presets). The global torch RNG is left untouched.
    """
    spec = get_spec(preset)
    config = spec.llama_config(vocab_size)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device)


CAUSAL_SDPA = "curtail_causal_sdpa"


def _causal_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def use_causal_sdpa(model: LlamaForCausalLM) -> None:
    """Train with SDPA's ``is_causal=True`` and no materialised mask.

    Under ``torch.compile`` with torch < 2.14, transformers cannot prove that no token is
    padded and passes SDPA an explicit [batch, 1, seq, seq] boolean mask, which rules out the
    causal kernels (FlashAttention refuses it; cuDNN computes the full square). Training batches
    here are full, unpadded windows of the corpus, so plain causal attention is the same
    function at about half the attention work. transformers creates no mask for an attention
    implementation it has no mask function for. Only the training model uses it: a saved
    model's config names no attention implementation and loads with the standard one.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)
    model.set_attn_implementation(CAUSAL_SDPA)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
