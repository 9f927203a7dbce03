"""Pseudo-gradients on the wire: casts, blockwise int8 / int4 quantisation, top-k sparsification,
lossless entropy coding and error feedback.

A :class:`WireFormat` says how a site's pseudo-gradient travels to the averaging actor
(``[training]`` keys ``transfer_dtype``, ``transfer_topk_fraction``, ``transfer_block_size``,
``error_feedback``). Per parameter tensor, flattened:

* **fp32 / bf16**: the values cast (bf16: round to nearest even, relative error ≤ 2⁻⁸); the
  dense arrays keep the tensor's shape and travel zero-copy through Ray's object store.
* **int8 / int4**: every ``block_size`` consecutive values share one float32 scale,
  ``absmax / q_max`` (``q_max`` 127 or 7); a value is ``round(x / scale)`` in
  ``[−q_max, q_max]``: int8 codes as ``int8``, int4 codes as unsigned nibbles ``q + 8``, two per
  byte (the first value in the high nibble). Error per value ≤ ``scale / 2``.
* **top-k** (``topk_fraction`` f): only the ``⌈f·n⌉`` largest-magnitude values of each tensor
  are sent, with their flat indices (ascending, delta-coded as ``uint32``); the kept values go
  through the codec above. The rest decode as 0. With ``topk_chunk`` c the choice is made per
  chunk of c consecutive values (``⌈f·c⌉`` each, SparseLoCo's chunk-wise top-k), so every part
  of a tensor sends some of its values each round.
* **entropy coding** (lossy formats): the codes and index deltas are compressed with Zstandard
  (lossless; int4 codes of a pseudo-gradient hold ~3 bits of information, so ~0.74 of their
  packed size).

**Error feedback** (lossy formats; the error-feedback rule of EF-SGD and SparseLoCo): a site
keeps the residual ``e`` of what it did not send. Each round it sends ``C(g + e)`` for its
pseudo-gradient ``g`` and keeps ``e ← g + e − D(C(g + e))``, so every part of an update arrives
eventually instead of being lost each round. With ``error_feedback_decay`` β < 1 the residual is
damped first, ``C(g + β·e)`` (SparseLoCo's accumulator, which stands in for the outer momentum). The residual is the site's state like its inner
optimizer: saved and restored with it (window drains, run checkpoints, resume); a site that dies
takes its residual with it — the tokens it had not delivered go back to the ledger and are
trained again, so the residual of that work must not arrive too.

Example::

    wire = WireFormat(codec="int4", topk_fraction=None)
    feedback = ErrorFeedback()
    packed = feedback.pack(deltas, wire)     # deltas: name -> tensor on any device
    packed.num_bytes                         # bytes on the wire
    grads = decompress(packed)               # the averaging actor: name -> float32 array
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import zstandard

from curtail.training.averaging import tensor_view

Codec = Literal["fp32", "bf16", "int8", "int4"]
CODECS: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
_Q_MAX = {"int8": 127, "int4": 7}
_ZSTD_LEVEL = 1  # ~200 MB/s per core and within 1 % of level 3's size on int4 codes


@dataclass(frozen=True)
class WireFormat:
    """How a pseudo-gradient travels (see the module doc)."""

    codec: Codec = "bf16"
    topk_fraction: float | None = None
    block_size: int = 128
    error_feedback: bool = True
    topk_chunk: int | None = None
    error_feedback_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown transfer dtype {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.topk_fraction is not None and not 0 < self.topk_fraction <= 1:
            raise ValueError(f"transfer_topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"transfer_block_size must be an even number >= 2, got {self.block_size}")
        if self.topk_chunk is not None and (self.topk_chunk < 1 or self.topk_fraction is None):
            raise ValueError(f"transfer_topk_chunk must be >= 1 and needs transfer_topk_fraction, got {self.topk_chunk}")
        if not 0 < self.error_feedback_decay <= 1:
            raise ValueError(f"error_feedback_decay must be in (0, 1], got {self.error_feedback_decay}")

    @property
    def lossy(self) -> bool:
        """Whether the receiver gets less than the fp32 values (every codec but fp32, or top-k)."""
        return self.codec != "fp32" or self.topk_fraction is not None

    @property
    def keeps_residual(self) -> bool:
        """Error feedback applies: a lossy format other than the plain bf16 cast (whose error,
        ≤ 2⁻⁸ relative, the runtime has always dropped)."""
        return self.error_feedback and self.lossy and not (self.codec == "bf16" and self.topk_fraction is None)

    @property
    def entropy_coded(self) -> bool:
        return self.codec in _Q_MAX or self.topk_fraction is not None


@dataclass(frozen=True)
class CompressedState:
    """A state dict packed for transfer.

    ``arrays``: per tensor the codes — dense fp32/bf16 arrays of the tensor's shape (bf16 as
    ``uint16`` bit patterns), or, for entropy-coded formats, a ``uint8`` Zstandard frame of the
    flat codes. ``shapes``: the tensors' shapes where ``arrays`` are not dense. ``scales``:
    int8/int4 block scales (float32). ``indices``: top-k index deltas (a Zstandard frame of
    ``uint32``). ``counts``: values encoded per tensor (top-k: kept values). ``coded``: False
    while the codes and indices are still raw (``encode(..., frame=False)``; frame them
    with :func:`entropy_code`, e.g. on a transfer thread).
    """

    dtype: Codec
    arrays: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    block_size: int = 0
    coded: bool = True

    @property
    def num_bytes(self) -> int:
        """Bytes on the wire (codes, scales and indices; names and shapes not counted)."""
        parts = (self.arrays, self.scales, self.indices)
        return sum(array.nbytes for part in parts for array in part.values())

    @property
    def dense(self) -> bool:
        return not self.shapes


# -------------------------------------------------------------------------------------------
# Encoding (torch, on the tensors' device) and decoding (host)


def encode(
    deltas: Mapping[str, torch.Tensor], wire: WireFormat, *, frame: bool = True
) -> tuple[CompressedState, dict[str, torch.Tensor]]:
    """Pack float tensors for transfer; also what the receiver will decode, on their device
    (float32, the tensors' shapes), for the error-feedback residual. Only the packed codes cross
    to the host; with ``frame=False`` they stay raw (see :func:`entropy_code`)."""
    if not wire.entropy_coded:
        wire_dtype = torch.bfloat16 if wire.codec == "bf16" else torch.float32
        arrays, decoded = {}, {}
        for name, tensor in deltas.items():
            cast = tensor.detach().to(wire_dtype)
            decoded[name] = cast.float()
            host = cast.cpu()
            arrays[name] = host.view(torch.int16).numpy().view(np.uint16) if wire.codec == "bf16" else host.numpy()
        return CompressedState(wire.codec, arrays), decoded
    packed = CompressedState(wire.codec, {}, block_size=wire.block_size, coded=False)
    decoded = {}
    for name, tensor in deltas.items():
        flat = tensor.detach().reshape(-1).float()
        values, index = flat, None
        if wire.topk_fraction is not None:
            index = _topk_index(flat, wire.topk_fraction, wire.topk_chunk)
            values = flat[index]
        codes, scales, restored = _quantise(values, wire)
        out = torch.zeros_like(flat) if index is not None else restored
        if index is not None:
            out[index] = restored
        decoded[name] = out.reshape(tensor.shape)
        packed.shapes[name] = tuple(tensor.shape)
        packed.counts[name] = int(values.numel())
        packed.arrays[name] = codes.cpu().numpy()
        if scales is not None:
            packed.scales[name] = scales.cpu().numpy()
        if index is not None:
            steps = torch.diff(index, prepend=index.new_zeros(1)).to(torch.int64).cpu().numpy().astype(np.uint32)
            packed.indices[name] = steps
    return (entropy_code(packed) if frame else packed), decoded


def entropy_code(packed: CompressedState) -> CompressedState:
    """``packed`` with its raw codes and top-k indices framed by Zstandard (as is, if they are)."""
    if packed.coded:
        return packed
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return dataclasses.replace(
        packed, coded=True, arrays={name: _frame(compressor, codes) for name, codes in packed.arrays.items()},
        indices={name: _frame(compressor, steps) for name, steps in packed.indices.items()},
    )


def decompress(packed: CompressedState) -> dict[str, np.ndarray]:
    """The float32 state dict a :class:`CompressedState` carries (new arrays)."""
    if packed.dtype not in CODECS:
        raise ValueError(f"unknown compression dtype {packed.dtype!r}; choose one of {', '.join(CODECS)}")
    if packed.dense:
        if packed.dtype == "fp32":
            return {name: np.array(array, dtype=np.float32) for name, array in packed.arrays.items()}
        if packed.dtype != "bf16":
            raise ValueError(f"a dense {packed.dtype} state is not a wire format; dense states are fp32 or bf16")
        # bf16 -> float32 is exact (the top half of a float32); torch widens in one threaded pass.
        return {
            name: tensor_view(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16).float().numpy()
            for name, array in packed.arrays.items()
        }
    decompressor = zstandard.ZstdDecompressor()
    out = {}
    for name, shape in packed.shapes.items():
        count = packed.counts[name]
        codes = (_unframe(decompressor, packed.arrays[name], _code_dtype(packed.dtype)) if packed.coded
                 else packed.arrays[name])
        scales = packed.scales.get(name)
        values = _dequantise(codes, None if scales is None else torch.from_numpy(np.array(scales)), packed.dtype,
                             count, packed.block_size)
        numel = math.prod(shape)
        if name in packed.indices:
            steps = (_unframe(decompressor, packed.indices[name], np.uint32) if packed.coded
                     else packed.indices[name]).astype(np.int64)
            dense = np.zeros(numel, dtype=np.float32)
            dense[np.cumsum(steps)] = values.numpy()
            out[name] = dense.reshape(shape)
        else:
            out[name] = values.numpy().reshape(shape)
    return out


def compress(state: Mapping[str, np.ndarray], dtype: Codec | WireFormat = "bf16") -> CompressedState:
    """Pack a float32 host state dict for transfer (no error feedback; see :class:`ErrorFeedback`)."""
    wire = dtype if isinstance(dtype, WireFormat) else WireFormat(codec=dtype)
    tensors = {name: tensor_view(np.ascontiguousarray(array, dtype=np.float32)) for name, array in state.items()}
    return encode(tensors, wire)[0]


class ErrorFeedback:
    """A site's residual of what it did not send (see the module doc): float32 tensors on the
    pseudo-gradients' device, created at the first lossy :meth:`pack`."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def pack(self, deltas: Mapping[str, torch.Tensor], wire: WireFormat, *, frame: bool = True) -> CompressedState:
        """``C(g + e)``, keeping ``e ← g + e − D(C(g + e))`` (plain :func:`encode` when the
        format keeps no residual). ``deltas`` may be updated in place."""
        if not wire.keeps_residual:
            return encode(deltas, wire, frame=frame)[0]
        corrected = {}
        for name, delta in deltas.items():
            residual = self.residual.get(name)
            corrected[name] = (delta.float() if residual is None
                               else delta.float().add_(residual, alpha=wire.error_feedback_decay))
        packed, decoded = encode(corrected, wire, frame=frame)
        self.residual.update({name: corrected[name].sub_(decoded[name]) for name in corrected})  # (a fragment: its names)
        return packed

    @property
    def norm(self) -> float:
        """The residual's L2 norm (0 before the first lossy round)."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.residual.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the residual, for checkpoints."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.residual = {name: torch.as_tensor(tensor).to(device, torch.float32, copy=True) for name, tensor in state.items()}


# -------------------------------------------------------------------------------------------


def _topk_index(flat: torch.Tensor, fraction: float, chunk: int | None) -> torch.Tensor:
    """Ascending flat indices of the largest-magnitude values: ``⌈f·n⌉`` of the tensor, or with
    ``chunk`` ``⌈f·chunk⌉`` of every chunk of ``chunk`` values (the last one padded with zeros)."""
    numel = flat.numel()
    if chunk is None or chunk >= numel:
        keep = min(numel, max(1, math.ceil(fraction * numel)))
        return torch.topk(flat.abs(), keep, sorted=False).indices.sort().values
    rows = math.ceil(numel / chunk)
    padded = torch.zeros(rows * chunk, dtype=flat.dtype, device=flat.device)
    padded[:numel] = flat.abs()
    keep = min(chunk, max(1, math.ceil(fraction * chunk)))
    local = torch.topk(padded.view(rows, chunk), keep, dim=1, sorted=False).indices
    index = (local + torch.arange(rows, device=flat.device).unsqueeze(1) * chunk).reshape(-1)
    return index[index < numel].sort().values


def _quantise(values: torch.Tensor, wire: WireFormat) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(codes, block scales or None, the decoded float32 values) of a flat float32 tensor."""
    if wire.codec == "fp32":
        return values, None, values
    if wire.codec == "bf16":
        cast = values.to(torch.bfloat16)
        return cast.view(torch.int16), None, cast.float()
    q_max = _Q_MAX[wire.codec]
    count, block = values.numel(), wire.block_size
    padded = torch.nn.functional.pad(values, (0, (-count) % block)).reshape(-1, block)
    scales = padded.abs().amax(dim=1) / q_max
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(padded / safe[:, None]).clamp_(-q_max, q_max)
    restored = (q * scales[:, None]).reshape(-1)[:count]
    if wire.codec == "int8":
        return q.reshape(-1)[:count].to(torch.int8), scales, restored
    nibbles = (q.reshape(-1) + 8).to(torch.uint8)  # padded to a whole block: an even length
    return (nibbles[0::2] << 4) | nibbles[1::2], scales, restored


def _dequantise(codes: np.ndarray, scales: torch.Tensor | None, codec: str, count: int, block: int) -> torch.Tensor:
    """Flat float32 values of :func:`_quantise`'s codes."""
    if codec == "fp32":
        return torch.from_numpy(codes.astype(np.float32, copy=False))
    if codec == "bf16":
        return torch.from_numpy(codes.view(np.int16)).view(torch.bfloat16).float()
    raw = torch.from_numpy(codes)
    if codec == "int4":
        q = torch.stack(((raw >> 4), raw & 0x0F), dim=1).reshape(-1).to(torch.float32) - 8
    else:
        q = raw.to(torch.float32)
    q = torch.nn.functional.pad(q[:count], (0, (-count) % block)).reshape(-1, block)
    assert scales is not None
    return (q * scales[:, None]).reshape(-1)[:count]


def _code_dtype(codec: str) -> type[np.generic]:
    return {"fp32": np.float32, "bf16": np.uint16, "int8": np.int8, "int4": np.uint8}[codec]


def _frame(compressor: zstandard.ZstdCompressor, array: np.ndarray) -> np.ndarray:
    return np.frombuffer(compressor.compress(np.ascontiguousarray(array).tobytes()), dtype=np.uint8)


def _unframe(decompressor: zstandard.ZstdDecompressor, frame: np.ndarray, dtype: Any) -> np.ndarray:
    return np.frombuffer(decompressor.decompress(np.asarray(frame).tobytes()), dtype=dtype).copy()


__all__ = ["CODECS", "Codec", "CompressedState", "ErrorFeedback", "WireFormat", "compress", "decompress", "encode",
           "entropy_code"]
