"""Tokenizer and corpus: BPE training and caching, token arrays, held-out split, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from curtail.training.data import TokenCorpus, load_corpus, token_dtype, tokenize_files
from curtail.training.tokenizer import END_OF_TEXT, load_tokenizer, train_tokenizer

torch.set_num_threads(1)  # tiny models gain nothing from more; robust when the CPU is shared

TEXT_DIR = Path(__file__).resolve().parents[1] / "data" / "text"
SHAKESPEARE = TEXT_DIR / "tinyshakespeare.txt"
WIKI_VALID = TEXT_DIR / "wikitext-2_valid.txt"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path):
    return train_tokenizer(SHAKESPEARE, vocab_size=512, cache_dir=cache_dir)


def test_tokenizer_round_trips_any_text(tokenizer) -> None:
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == END_OF_TEXT
    for text in ["To be, or not to be", "naïve café ✓ 東京\n\n  indented", ""]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    # BPE learned merges: even 255 of them make English well shorter than one token per byte.
    text = SHAKESPEARE.read_text()[:20_000]
    assert len(tokenizer(text)["input_ids"]) < 0.6 * len(text.encode())


def test_tokenizer_is_cached_by_corpus_and_vocab(cache_dir: Path, tokenizer) -> None:
    folders = sorted(p.name for p in cache_dir.glob("bpe-*"))
    assert len(folders) == 1 and folders[0].endswith("-vocab512")
    marker = cache_dir / folders[0] / "marker"
    marker.write_text("cached")
    again = train_tokenizer(SHAKESPEARE, vocab_size=512, cache_dir=cache_dir)
    assert marker.exists()  # reused, not retrained over
    assert again.get_vocab() == tokenizer.get_vocab()
    train_tokenizer(SHAKESPEARE, vocab_size=300, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("bpe-*"))) == 2


def test_tokenizer_saves_the_hugging_face_way(tmp_path: Path, tokenizer) -> None:
    tokenizer.save_pretrained(tmp_path)
    text = "Romeo, Romeo! wherefore art thou Romeo?"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert load_tokenizer(tmp_path)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_tokenizer_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer(SHAKESPEARE, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer(tmp_path / "missing.txt", vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corpus_tokens_match_the_text(cache_dir: Path, tokenizer) -> None:
    tokens = tokenize_files(SHAKESPEARE, tokenizer, cache_dir)
    assert tokens.dtype == np.uint16
    assert tokenizer.decode(tokens.tolist()) == SHAKESPEARE.read_text()
    cached = list(cache_dir.glob("tokens-*.npy"))
    assert len(cached) == 1
    assert np.array_equal(np.load(cached[0]), tokens)
    again = tokenize_files(SHAKESPEARE, tokenizer, cache_dir)
    assert isinstance(again, np.memmap)  # read from the cache
    assert np.array_equal(again, tokens)


def test_heldout_split_is_the_last_five_percent(cache_dir: Path, tokenizer) -> None:
    train, heldout = load_corpus(SHAKESPEARE, tokenizer, cache_dir)
    everything = tokenize_files(SHAKESPEARE, tokenizer, cache_dir)
    assert train.num_tokens + heldout.num_tokens == len(everything)
    assert heldout.num_tokens == round(0.05 * len(everything))
    assert np.array_equal(heldout.tokens, everything[train.num_tokens :])
    assert np.array_equal(train.tokens, everything[: train.num_tokens])
    assert train.num_trainable_tokens == train.num_tokens - 1


def test_separate_heldout_file(cache_dir: Path, tokenizer) -> None:
    train, heldout = load_corpus(SHAKESPEARE, tokenizer, cache_dir, heldout_paths=WIKI_VALID)
    assert train.num_tokens == len(tokenize_files(SHAKESPEARE, tokenizer, cache_dir))
    assert heldout.num_tokens > 100_000
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        load_corpus(SHAKESPEARE, tokenizer, cache_dir, heldout_fraction=1.0)


def test_batches_read_consecutive_tokens() -> None:
    corpus = TokenCorpus(np.arange(100, dtype=np.uint16))
    input_ids, labels = corpus.batch(start_token=10, batch_size=3, seq_len=4)
    assert input_ids.dtype == torch.int64
    assert input_ids.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    assert labels.tolist() == [[11, 12, 13, 14], [15, 16, 17, 18], [19, 20, 21, 22]]
    _, last_labels = corpus.batch(start_token=95, batch_size=1, seq_len=4)
    assert last_labels[0, -1].item() == 99  # the last token is only ever a label
    with pytest.raises(ValueError, match="only \\[0, 99\\) can be trained"):
        corpus.batch(start_token=96, batch_size=1, seq_len=4)
    starts = [start for start, _, _ in corpus.iter_batches(0, 30, batch_size=2, seq_len=4)]
    assert starts == [0, 8, 16]  # [24, 30) is shorter than a batch


def test_token_dtype() -> None:
    assert token_dtype(65_536) is np.uint16
    assert token_dtype(65_537) is np.uint32
