"""Tokenizer: a byte-level BPE trained on the run's corpus, cached, and saved the Hugging Face way.

:func:`train_tokenizer` trains a GPT-2-style byte-level BPE (every byte is in the alphabet,
so any text round-trips) with the ``tokenizers`` library and wraps it as a
``transformers.PreTrainedTokenizerFast``; ``tokenizer.save_pretrained(dir)`` then writes it
beside the model, and ``AutoTokenizer.from_pretrained(dir)`` loads both back.

Training is cached under ``cache_dir`` by (sha256 of the corpus files, vocabulary size), so
repeated runs and every site of one run share one tokenizer without retraining.

Example::

    tokenizer = train_tokenizer("data/text/tinyshakespeare.txt", vocab_size=512,
                                cache_dir=".cache/curtail")
    ids = tokenizer("To be, or not to be")["input_ids"]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: The one special token: marks document ends; also serves as the pad token.
END_OF_TEXT = "<|endoftext|>"

PathLike = str | os.PathLike[str]


def file_sha256(paths: PathLike | Sequence[PathLike]) -> str:
    """sha256 over the bytes of one file or several (in order), as hex."""
    digest = hashlib.sha256()
    for path in as_path_list(paths):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def train_tokenizer(
    corpus_paths: PathLike | Sequence[PathLike],
    vocab_size: int,
    cache_dir: PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train (or load from ``cache_dir``) a byte-level BPE with ``vocab_size`` tokens in total.

    ``vocab_size`` counts the 256 byte tokens and the end-of-text token; it must be at least
    257. The result's ``len(tokenizer)`` may come out below ``vocab_size`` on a corpus too
    small to learn that many merges; size the model with ``len(tokenizer)``.
    """
    paths = as_path_list(corpus_paths)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer corpus {path} does not exist; pass a text file")
    min_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {min_vocab} "
            f"(256 bytes + {END_OF_TEXT})"
        )
    cached: Path | None = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"bpe-{file_sha256(paths)[:16]}-vocab{vocab_size}"
        if (cached / "tokenizer.json").is_file():
            return load_tokenizer(cached)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(path) for path in paths], trainer)
    tokenizer = _wrap(bpe)

    if cached is not None:
        # Write to a private folder, then rename: concurrent sites never see half a tokenizer.
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, cached)
        except OSError:  # another process finished first; its tokenizer is the same
            shutil.rmtree(staging, ignore_errors=True)
            return load_tokenizer(cached)
    return tokenizer


def load_tokenizer(directory: PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` or ``save_pretrained``."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no tokenizer.json; train one with train_tokenizer() or pass the "
            "folder a model was saved to"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def _wrap(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=1 << 30,  # the corpus is tokenized whole; no truncation warnings
    )


def as_path_list(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """One path or several, as a non-empty list of ``Path``."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    result = [Path(path) for path in paths]
    if not result:
        raise ValueError("no corpus files given; pass at least one text file")
    return result
