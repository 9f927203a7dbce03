"""Data: a local text corpus tokenized once into one flat token array, with a held-out part.

:func:`load_corpus` reads text files with ``datasets`` (the packaged ``"text"`` builder,
offline), tokenizes them, and caches the flat token array as ``.npy`` under ``cache_dir``
keyed by (corpus sha256, tokenizer sha256). The held-out part is either the last
``heldout_fraction`` of the training file(s) (the default: 5%) or separate file(s).

A :class:`TokenCorpus` hands out batches of consecutive tokens, addressed by the first token
position: ``corpus.batch(start_token, batch_size, seq_len)`` covers the positions
``[start_token, start_token + batch_size * seq_len)`` row by row, and its labels are the same
positions shifted by one (the next token), so each batch trains exactly
``batch_size * seq_len`` tokens and reads one token past its end for the last label. Hence
the positions a run can train are ``[0, corpus.num_trainable_tokens)`` — the range to give the
data :mod:`~curtail.training.ledger`.

Example::

    train, heldout = load_corpus("data/text/tinyshakespeare.txt", tokenizer, cache_dir=".cache")
    input_ids, labels = train.batch(start_token=0, batch_size=8, seq_len=64)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from curtail.training.tokenizer import PathLike, as_path_list, file_sha256

#: Held-out share of the training file(s) when no separate held-out file is given.
DEFAULT_HELDOUT_FRACTION = 0.05


class TokenCorpus:
    """A flat array of token ids (uint16 or uint32, possibly memory-mapped) read in batches."""

    def __init__(self, tokens: np.ndarray, name: str = "corpus") -> None:
        if tokens.ndim != 1:
            raise ValueError(f"{name}: token array must be 1-D, got shape {tokens.shape}")
        self.tokens = tokens
        self.name = name

    def evaluation_starts(self, num_batches: int, batch_size: int, seq_len: int) -> np.ndarray:
        """Where the ``num_batches`` evaluation batches of ``batch_size × seq_len`` start: spread
        evenly over the corpus, the same every call (fewer if the corpus is too short)."""
        if num_batches <= 0:
            raise ValueError(f"num_batches must be > 0, got {num_batches}")
        num_batch_tokens = batch_size * seq_len
        last_start = self.num_trainable_tokens - num_batch_tokens
        if last_start < 0:
            raise ValueError(
                f"{self.name} has {self.num_tokens} tokens, fewer than one {batch_size}x"
                f"{seq_len} batch; use a smaller batch or a larger held-out corpus"
            )
        num_batches = min(num_batches, last_start // num_batch_tokens + 1)
        return np.linspace(0, last_start, num_batches).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        """Tokens in the array."""
        return int(self.tokens.shape[0])

    @property
    def num_trainable_tokens(self) -> int:
        """Token positions that have a next token to predict: ``num_tokens - 1``."""
        return max(self.num_tokens - 1, 0)

    def batch(
        self, start_token: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, each ``int64 [batch_size, seq_len]``, from ``start_token`` on.

        Row ``i`` holds positions ``start_token + i*seq_len ...`` and its labels are the tokens
        one position later.
        """
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        num_batch_tokens = batch_size * seq_len
        end_token = start_token + num_batch_tokens
        if start_token < 0 or end_token > self.num_trainable_tokens:
            raise ValueError(
                f"{self.name}: a batch of {batch_size}x{seq_len} tokens from position "
                f"{start_token} needs positions up to {end_token} but only "
                f"[0, {self.num_trainable_tokens}) can be trained; start earlier or use a "
                "smaller batch"
            )
        window = np.asarray(self.tokens[start_token : end_token + 1], dtype=np.int64)
        input_ids = torch.from_numpy(window[:-1].reshape(batch_size, seq_len))
        labels = torch.from_numpy(window[1:].reshape(batch_size, seq_len))
        return input_ids, labels

    def iter_batches(
        self, start_token: int, end_token: int, batch_size: int, seq_len: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start_token, input_ids, labels)`` for each whole batch inside ``[start, end)``.

        A remainder shorter than one batch is not yielded (it stays untrained).
        """
        num_batch_tokens = batch_size * seq_len
        position = start_token
        while position + num_batch_tokens <= end_token:
            input_ids, labels = self.batch(position, batch_size, seq_len)
            yield position, input_ids, labels
            position += num_batch_tokens

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenCorpus({self.name!r}, num_tokens={self.num_tokens}, dtype={self.tokens.dtype})"


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned integer type that holds every id of a ``vocab_size`` vocabulary."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_files(
    paths: PathLike | Sequence[PathLike],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: PathLike | None = None,
) -> np.ndarray:
    """All text of ``paths``, in order, as one flat token array; cached as ``.npy``.

    Line breaks are kept, so the token stream is the files' text (no tokens added between
    lines or files). The cache is read memory-mapped.
    """
    paths = as_path_list(paths)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist; pass a local text file")
    cached: Path | None = None
    if cache_dir is not None:
        key = f"{file_sha256(paths)[:16]}-{tokenizer_sha256(tokenizer)[:16]}"
        cached = Path(cache_dir) / f"tokens-{key}.npy"
        if cached.is_file():
            return np.load(cached, mmap_mode="r")

    tokens = _tokenize_with_datasets(paths, tokenizer, cache_dir)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=cached.name, suffix=".npy", dir=cached.parent)
        with os.fdopen(handle, "wb") as out:
            np.save(out, tokens)
        os.replace(staging, cached)  # atomic: concurrent sites never read half a file
    return tokens


def load_corpus(
    train_paths: PathLike | Sequence[PathLike],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: PathLike | None = None,
    heldout_paths: PathLike | Sequence[PathLike] | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> tuple[TokenCorpus, TokenCorpus]:
    """``(train, heldout)`` corpora.

    With ``heldout_paths`` the held-out corpus is those files and ``train`` is all of
    ``train_paths``; otherwise the last ``heldout_fraction`` of the training tokens is held
    out (deterministic: the same files and tokenizer always split at the same position).
    """
    tokens = tokenize_files(train_paths, tokenizer, cache_dir)
    if heldout_paths is not None:
        heldout = tokenize_files(heldout_paths, tokenizer, cache_dir)
        return TokenCorpus(tokens, "train"), TokenCorpus(heldout, "heldout")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(
            f"heldout_fraction must be in (0, 1), got {heldout_fraction}; or pass heldout_paths"
        )
    split = len(tokens) - round(len(tokens) * heldout_fraction)
    if split < 2 or len(tokens) - split < 2:
        raise ValueError(
            f"corpus of {len(tokens)} tokens is too small to hold out {heldout_fraction:.0%}; "
            "use a larger corpus or pass heldout_paths"
        )
    return TokenCorpus(tokens[:split], "train"), TokenCorpus(tokens[split:], "heldout")


def _tokenize_with_datasets(
    paths: list[Path], tokenizer: PreTrainedTokenizerBase, cache_dir: PathLike | None
) -> np.ndarray:
    import datasets  # heavy; only needed on a cache miss

    dtype = token_dtype(len(tokenizer))
    progress_was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        text = datasets.load_dataset(
            "text",
            data_files={"corpus": [str(path) for path in paths]},
            keep_linebreaks=True,
            cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf_datasets"),
            split="corpus",
        )
        encoded = text.map(
            lambda rows: {"input_ids": tokenizer(rows["text"])["input_ids"]},
            batched=True,
            remove_columns=["text"],
            keep_in_memory=True,
        )
        pieces = [np.asarray(ids, dtype=dtype) for ids in encoded["input_ids"]]
    finally:
        if progress_was_on:
            datasets.enable_progress_bars()
    if not pieces:
        raise ValueError(f"corpus {', '.join(map(str, paths))} is empty; pass a file with text")
    return np.concatenate(pieces)


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of a fast tokenizer's serialised form: equal hashes encode text equally."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("curtail needs a fast (tokenizers-backed) tokenizer")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()
