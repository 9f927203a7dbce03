"""Token shards: ``curtail prepare-data`` writes them, :class:`ShardedTokens` reads them lazily.

The stream the shards hold is exactly what tokenizing the files in memory gives; batches that
cross shard boundaries equal the flat array's; the folder does not depend on the number of
encoding processes; bad inputs, damaged folders and unknown keys are clear errors; a folder on
object storage (moto) is fetched one shard at a time and the cache is emptied again.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curtail.config import ConfigError, parse_experiment
from curtail.errors import CorpusError
from curtail.training.data import TokenCorpus, load_corpus, tokenize_files
from curtail.training.prepare import prepare_shards
from curtail.training.shards import MANIFEST_NAME, ShardedTokens, load_manifest, tokenizer_folder
from curtail.training.tokenizer import END_OF_TEXT, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "text" / "tinyshakespeare.txt"
WIKI = ROOT / "data" / "text" / "wikitext-2_valid.txt"
SHARD_TOKENS = 7_919  # a prime: batches straddle shard boundaries


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(SHAKESPEARE.read_text()[:150_000])
    return path


@pytest.fixture(scope="module")
def shards(text_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "corpus"
    prepare_shards([text_file], folder, vocab_size=512, shard_tokens=SHARD_TOKENS,
                   cache_dir=tmp_path_factory.mktemp("cache"))
    return folder


@pytest.fixture(scope="module")
def mixed_sources(tmp_path_factory) -> Path:
    """A folder of a JSONL, a Parquet and a text file (real text)."""
    folder = tmp_path_factory.mktemp("mixed")
    documents = [line for line in WIKI.read_text().splitlines() if line.strip()]
    with open(folder / "a.jsonl", "w") as out:
        out.writelines(json.dumps({"id": 1, "text": document}) + "\n" for document in documents[:300])
    pq.write_table(pa.table({"text": documents[300:600], "n": list(range(300))}), folder / "b.parquet")
    (folder / "c.txt").write_text(SHAKESPEARE.read_text()[:60_000])
    return folder


def test_the_shards_hold_exactly_the_in_memory_tokens_and_split(text_file, shards, tmp_path):
    tokenizer = train_tokenizer(text_file, 512, tmp_path)
    flat = tokenize_files(text_file, tokenizer, tmp_path)
    train, heldout = load_corpus(text_file, tokenizer, tmp_path)
    tokens = ShardedTokens.open(shards)
    manifest = tokens.manifest
    assert len(manifest.shards) == -(-len(flat) // SHARD_TOKENS) >= 3
    assert np.array_equal(tokens[:], flat) and tokens.dtype == flat.dtype
    assert np.array_equal(tokens.train()[:], train.tokens) and np.array_equal(tokens.heldout()[:], heldout.tokens)
    # the tokenizer travels with the shards, and is the one a corpus= run trains
    assert load_tokenizer(tokenizer_folder(shards)).get_vocab() == tokenizer.get_vocab()
    assert manifest.vocab_size == len(tokenizer) and manifest.eos_between_documents is False


def test_batches_across_shard_boundaries_equal_the_flat_arrays(shards, text_file, tmp_path):
    tokenizer = train_tokenizer(text_file, 512, tmp_path)
    flat = TokenCorpus(tokenize_files(text_file, tokenizer, tmp_path), "flat")
    sharded = TokenCorpus(ShardedTokens.open(shards, max_mapped_shards=2), "sharded")
    assert sharded.num_trainable_tokens == flat.num_trainable_tokens
    for start in (0, SHARD_TOKENS - 5, 2 * SHARD_TOKENS - 128, flat.num_trainable_tokens - 4 * 64):
        for got, want in zip(sharded.batch(start, 4, 64), flat.batch(start, 4, 64), strict=True):
            assert torch_equal(got, want)
    assert sharded.tokens.manifest.locate(SHARD_TOKENS + 3) == (1, 3)
    assert len(sharded.tokens._mapped) <= 2  # the oldest mappings were let go


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape


def test_a_shard_range_crosses_to_a_worker_as_its_location_not_its_tokens(shards):
    tokens = ShardedTokens.open(shards).train()
    tokens[0:10]  # maps a shard
    blob = pickle.dumps(tokens)
    assert len(blob) < 8_000  # the manifest and the range; the corpus is ~40k tokens
    again = pickle.loads(blob)
    assert len(again) == len(tokens) and np.array_equal(again[100:20_000], tokens[100:20_000])


def test_documents_end_with_eos_and_the_folder_does_not_depend_on_processes(mixed_sources, tmp_path):
    one = prepare_shards([mixed_sources], tmp_path / "one", vocab_size=512, shard_tokens=20_000,
                         tokenizer_sample_bytes=200_000, cache_dir=tmp_path / "cache")
    two = prepare_shards([mixed_sources], tmp_path / "two", vocab_size=512, shard_tokens=20_000,
                         tokenizer_sample_bytes=200_000, cache_dir=tmp_path / "cache", num_proc=2)
    assert one.identity == two.identity and one.shards == two.shards
    assert [s.format for s in one.sources] == ["json", "parquet", "text"] and one.eos_between_documents
    tokenizer = load_tokenizer(tokenizer_folder(tmp_path / "one"))
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    tokens = ShardedTokens.open(tmp_path / "one")[:]
    json_tokens = sum(s.num_tokens for s in one.shards if s.source == 0)
    assert (tokens[:json_tokens] == eos).sum() == 300 and tokens[json_tokens - 1] == eos  # one per document
    parquet_tokens = sum(s.num_tokens for s in one.shards if s.source == 1)
    assert (tokens[json_tokens:json_tokens + parquet_tokens] == eos).sum() == 300
    assert (tokens[json_tokens + parquet_tokens:] == eos).sum() == 0  # text: lines, nothing between
    first = json.loads((mixed_sources / "a.jsonl").read_text().splitlines()[0])["text"]
    assert tokenizer.decode(tokens[: tokens.tolist().index(eos)]) == first


def test_separate_heldout_files_start_where_the_training_files_end(text_file, tmp_path):
    manifest = prepare_shards([text_file], tmp_path / "s", vocab_size=512, heldout=[WIKI],
                              cache_dir=tmp_path / "cache")
    train_only = sum(s.num_tokens for s in manifest.shards if not manifest.sources[s.source].heldout)
    assert manifest.heldout_start == train_only and manifest.sources[-1].heldout
    tokens = ShardedTokens.open(tmp_path / "s")
    tokenizer = load_tokenizer(tokenizer_folder(tmp_path / "s"))
    assert np.array_equal(tokens.heldout()[:], tokenize_files(WIKI, tokenizer))


def test_bad_inputs_and_outputs_are_clear_errors(text_file, mixed_sources, shards, tmp_path):
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(CorpusError, match=r"notes.docx: unknown corpus file type; use \.txt"):
        prepare_shards([tmp_path / "notes.docx"], tmp_path / "out")
    with pytest.raises(CorpusError, match="missing.txt does not exist"):
        prepare_shards([tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(CorpusError, match=r"a.jsonl has no field 'body' \(it has id, text\); pick the text column"):
        prepare_shards([mixed_sources / "a.jsonl"], tmp_path / "out", text_field="body", vocab_size=300,
                       tokenizer=tokenizer_folder(shards))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl could not be read as json"):
        prepare_shards([tmp_path / "broken.jsonl"], tmp_path / "out", tokenizer=tokenizer_folder(shards))
    with pytest.raises(CorpusError, match="already holds a shard folder; pass --overwrite"):
        prepare_shards([text_file], shards, vocab_size=512)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CorpusError, match="a folder with other files in it"):
        prepare_shards([text_file], busy, vocab_size=512)
    assert (busy / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".shards-*"))  # no staging left behind


def test_a_damaged_shard_folder_names_the_file(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = load_manifest(copy)
    second = copy / manifest.shards[1].file
    second.write_bytes(second.read_bytes()[:-2])
    tokens = ShardedTokens.open(copy)
    tokens[0:100]
    with pytest.raises(CorpusError, match=f"{manifest.shards[1].file} has .* bytes but the manifest says"):
        tokens[SHARD_TOKENS : SHARD_TOKENS + 10]
    shutil.copy(shards / manifest.shards[1].file, second)
    third = copy / manifest.shards[2].file
    data = bytearray(third.read_bytes())
    data[0] ^= 1
    third.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=f"{manifest.shards[2].file} does not match its sha256"):
        ShardedTokens.open(copy).verify()
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(CorpusError, match="holds no manifest.json; write a shard folder there with `curtail prepare-data"):
        ShardedTokens.open(copy)


def test_a_shard_folder_on_object_storage_is_read_a_shard_at_a_time(text_file, s3_server, tmp_path):
    uri = s3_server.format(path="shards/corpus")
    manifest = prepare_shards([text_file], uri, vocab_size=512, shard_tokens=SHARD_TOKENS,
                              cache_dir=tmp_path / "cache")
    local = ShardedTokens.open(prepare_shards_locally(text_file, tmp_path))
    remote = ShardedTokens.open(uri, cache_dir=tmp_path / "fetched", max_mapped_shards=2)
    assert remote.manifest == manifest == local.manifest
    assert np.array_equal(remote[0:100], local[0:100])
    cached = list((tmp_path / "fetched").rglob("*.bin"))
    assert len(cached) == 1  # only the shard touched
    assert np.array_equal(remote[:], local[:])
    assert len(list((tmp_path / "fetched").rglob("*.bin"))) <= 2  # unmapped shards left the cache
    tokenizer = load_tokenizer(tokenizer_folder(uri, tmp_path / "fetched"))
    assert len(tokenizer) == manifest.vocab_size
    del remote
    assert not list((tmp_path / "fetched").rglob("*.bin"))


def prepare_shards_locally(text_file: Path, tmp_path: Path) -> Path:
    prepare_shards([text_file], tmp_path / "local", vocab_size=512, shard_tokens=SHARD_TOKENS,
                   cache_dir=tmp_path / "cache")
    return tmp_path / "local"


def test_a_run_config_takes_shards_or_files_not_both(tmp_path):
    base = {"name": "x", "token_budget": 1000, "traces": [{"path": "t.csv"}],
            "sites": {"a": {"region": "A", "training_power_w": 1, "idle_power_w": 1, "tokens_per_s": 1}},
            "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": ["a"]}]}
    config = parse_experiment({**base, "training": {"corpus_shards": "shards/wiki"}}, base_dir=tmp_path)
    assert config.training.corpus_shards == str(tmp_path / "shards/wiki")
    uri = "s3://bucket/shards?endpoint_override=h:1"
    assert parse_experiment({**base, "training": {"corpus_shards": uri}}, base_dir=tmp_path).training.corpus_shards == uri
    with pytest.raises(ConfigError, match="corpus_shards brings its own tokens, tokenizer and held-out part: "
                                          "leave out corpus, vocab_size"):
        parse_experiment({**base, "training": {"corpus_shards": "s", "corpus": ["a.txt"], "vocab_size": 512}})


def test_prepare_data_from_the_command_line(text_file, tmp_path):
    command = [sys.executable, "-m", "curtail", "prepare-data", str(text_file), "--output", str(tmp_path / "s"),
               "--vocab-size", "300", "--shard-tokens", "10000", "--cache-dir", str(tmp_path / "cache"), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    record = json.loads(done.stdout)
    manifest = load_manifest(tmp_path / "s")
    assert record["num_tokens"] == manifest.num_tokens and record["shards"] == len(manifest.shards) >= 5
    assert record["vocab_size"] == 300 and record["identity"] == manifest.identity
    again = subprocess.run(command[:-1], check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a shard folder; pass --overwrite" in again.stderr


def test_preflight_names_a_missing_shard_folder(tmp_path):
    from curtail.errors import PreflightError
    from curtail.preflight import check_run_files

    base = {"name": "x", "token_budget": 1000, "traces": [{"path": "t.csv"}],
            "sites": {"a": {"region": "A", "training_power_w": 1, "idle_power_w": 1, "tokens_per_s": 1}},
            "runs": [{"name": "r", "policy": {"kind": "threshold"}, "sites": ["a"]}],
            "training": {"corpus_shards": str(tmp_path / "nowhere"), "cache_dir": str(tmp_path / "cache")}}
    with pytest.raises(PreflightError, match=r"training.corpus_shards: .*nowhere holds no manifest.json"):
        check_run_files(parse_experiment(base))
