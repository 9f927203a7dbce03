"""Site trainer: real-text training, determinism, weights in/out, saving, data parallelism,
and a two-site DiLoCo round trip through ledger, schedule and outer step."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from curtail.training.averaging import make_outer_optimizer, pseudo_gradient
from curtail.training.compression import compress, decompress
from curtail.training.data import TokenCorpus, load_corpus
from curtail.training.ledger import DataLedger
from curtail.training.loop import COMPILE_MODES, SiteTrainer
from curtail.training.schedule import LRSchedule
from curtail.training.tokenizer import train_tokenizer

torch.set_num_threads(1)  # tiny models gain nothing from more; robust when the CPU is shared

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "text" / "tinyshakespeare.txt"
BATCH_SIZE, SEQ_LEN = 8, 64
BATCH_TOKENS = BATCH_SIZE * SEQ_LEN


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(SHAKESPEARE, vocab_size=512, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpora(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenCorpus, TokenCorpus]:
    return load_corpus(SHAKESPEARE, tokenizer, cache_dir=tmp_path_factory.mktemp("data"))


def make_trainer(tokenizer, seed: int = 0, **kwargs) -> SiteTrainer:
    return SiteTrainer("tiny", vocab_size=len(tokenizer), seed=seed, device="cpu", **kwargs)


def test_loss_falls_on_real_text(tokenizer, corpora) -> None:
    train, heldout = corpora
    trainer = make_trainer(tokenizer)
    before = trainer.evaluate(heldout, num_batches=4, batch_size=BATCH_SIZE)
    assert before == pytest.approx(np.log(len(tokenizer)), rel=0.05)  # uniform at init
    losses = [
        trainer.train_step(input_ids, labels, lr=3e-3)
        for _, input_ids, labels in train.iter_batches(0, 30 * BATCH_TOKENS, BATCH_SIZE, SEQ_LEN)
    ]
    after = trainer.evaluate(heldout, num_batches=4, batch_size=BATCH_SIZE)
    assert len(losses) == 30 and trainer.num_steps == 30
    assert trainer.tokens_trained == 30 * BATCH_TOKENS
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    assert after < before - 1.0, (before, after)


def test_training_is_deterministic(tokenizer, corpora) -> None:
    train, _ = corpora
    first, second = make_trainer(tokenizer, seed=3), make_trainer(tokenizer, seed=3)
    for trainer in (first, second):
        for _, input_ids, labels in train.iter_batches(0, 3 * BATCH_TOKENS, BATCH_SIZE, SEQ_LEN):
            trainer.train_step(input_ids, labels, lr=1e-3)
    a, b = first.export_params(), second.export_params()
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_micro_batches_accumulate_to_the_full_batch(tokenizer, corpora) -> None:
    train, _ = corpora
    # AdamW's first step is lr * g / (|g| + eps): with the default eps it is near sign(g), so a
    # float-rounding difference flips single near-zero gradients (and would hide a scale error);
    # a large eps makes the step proportional to the accumulated gradient itself
    whole, micro = make_trainer(tokenizer, eps=1e-3), make_trainer(tokenizer, micro_batch_size=3, eps=1e-3)
    input_ids, labels = train.batch(0, BATCH_SIZE, SEQ_LEN)
    loss_whole = whole.train_step(input_ids, labels, lr=1e-3)
    loss_micro = micro.train_step(input_ids, labels, lr=1e-3)
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)
    a, b = whole.export_params(), micro.export_params()
    assert all(np.allclose(a[name], b[name], atol=1e-7) for name in a)


def test_activation_checkpointing_recomputes_the_same_step(tokenizer, corpora) -> None:
    train, _ = corpora
    plain, recomputed = make_trainer(tokenizer, eps=1e-3), make_trainer(tokenizer, activation_checkpointing=True, eps=1e-3)
    assert recomputed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    losses = [[trainer.train_step(input_ids, labels, lr=1e-3)
               for _, input_ids, labels in train.iter_batches(0, 2 * BATCH_TOKENS, BATCH_SIZE, SEQ_LEN)]
              for trainer in (plain, recomputed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = plain.export_params(), recomputed.export_params()
    assert all(np.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_weights_and_optimizer_state_move_between_trainers(tokenizer, corpora) -> None:
    train, _ = corpora
    batches = [train.batch(i * BATCH_TOKENS, BATCH_SIZE, SEQ_LEN) for i in range(3)]
    original = make_trainer(tokenizer)
    for input_ids, labels in batches[:2]:
        original.train_step(input_ids, labels, lr=1e-3)
    exported = original.export_params()
    assert all(a.dtype == np.float32 for a in exported.values())
    exported_before = {name: array.copy() for name, array in exported.items()}

    resumed = make_trainer(tokenizer, seed=99)  # different init: everything must come over
    resumed.load_global({name: _read_only(array) for name, array in exported.items()})
    resumed.load_optimizer_state_dict(original.optimizer_state_dict())
    assert resumed.num_steps == 2
    for trainer in (original, resumed):
        trainer.train_step(*batches[2], lr=1e-3)
    a, b = original.export_params(), resumed.export_params()
    assert all(np.array_equal(a[name], b[name]) for name in a)
    # export_params gave copies: training did not change them.
    assert all(np.array_equal(exported[name], exported_before[name]) for name in exported)

    with pytest.raises(ValueError, match="missing"):
        resumed.load_global({"lm_head.weight": exported["lm_head.weight"]})


def test_a_compile_mode_torch_lacks_is_refused_with_the_modes_it_has() -> None:
    with pytest.raises(ValueError, match="compile_mode 'max_autotune': use one of default, max-autotune-no-cudagraphs"):
        SiteTrainer("tiny", vocab_size=256, seed=0, device="cpu", compile_model=True, compile_mode="max_autotune")
    import torch._inductor

    assert set(COMPILE_MODES) <= set(torch._inductor.list_mode_options())  # each one torch.compile accepts


def test_save_pretrained_reloads_with_transformers(tokenizer, corpora, tmp_path: Path) -> None:
    train, _ = corpora
    trainer = make_trainer(tokenizer)
    trainer.train_step(*train.batch(0, BATCH_SIZE, SEQ_LEN), lr=1e-3)
    trainer.save_pretrained(tmp_path / "model", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    reloaded.eval()
    trainer.model.eval()
    input_ids, _ = train.batch(BATCH_TOKENS, 2, SEQ_LEN)
    with torch.no_grad():
        expected = trainer.model(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
    assert torch.equal(expected, actual)
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("Hamlet")["input_ids"] == (
        tokenizer("Hamlet")["input_ids"]
    )


def test_two_sites_diloco_rounds(tokenizer, corpora) -> None:
    """Two sites, two federated rounds: the runtime's loop in miniature."""
    train, heldout = corpora
    ledger = DataLedger(train.num_trainable_tokens, block_tokens=BATCH_TOKENS)
    schedule = LRSchedule(peak_lr=3e-3, total_tokens=40 * BATCH_TOKENS, warmup_tokens=4 * BATCH_TOKENS)
    outer = make_outer_optimizer("nesterov")
    sites = {"caiso_north": make_trainer(tokenizer), "nem_sa": make_trainer(tokenizer)}
    global_params = sites["caiso_north"].export_params()
    initial_loss = sites["nem_sa"].evaluate(heldout, num_batches=2, batch_size=BATCH_SIZE)
    steps_per_round = {"caiso_north": 6, "nem_sa": 2}  # unequal throughput
    for _ in range(2):
        pseudo_grads, tokens = {}, {}
        for site, trainer in sites.items():
            trainer.load_global(global_params)
            token_range = ledger.claim(site, steps_per_round[site] * BATCH_TOKENS)
            trained = 0
            for _, input_ids, labels in train.iter_batches(
                token_range.start, token_range.end, BATCH_SIZE, SEQ_LEN
            ):
                trainer.train_step(input_ids, labels, lr=schedule.lr_at(ledger.trained_tokens + trained + BATCH_TOKENS))
                trained += BATCH_TOKENS
            ledger.complete(site, token_range, trained)
            # bf16 on the wire, as the runtime sends it
            pseudo_grads[site] = decompress(compress(pseudo_gradient(global_params, trainer.export_params())))
            tokens[site] = trained
        outer.step(global_params, pseudo_grads, tokens)
    ledger.check_invariants()
    assert ledger.trained_by_site == {"caiso_north": 12 * BATCH_TOKENS, "nem_sa": 4 * BATCH_TOKENS}
    assert ledger.trained_tokens == 16 * BATCH_TOKENS
    evaluator = make_trainer(tokenizer)
    evaluator.load_global(global_params)
    assert evaluator.evaluate(heldout, num_batches=2, batch_size=BATCH_SIZE) < initial_loss - 0.5


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False  # as arrays from Ray's object store arrive
    return view


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_parallel_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        batch = torch.load(Path(out_dir) / "batch.pt")
        rows = slice(rank * 4, rank * 4 + 4)  # each rank trains its half of the batch
        trainer = SiteTrainer("tiny", vocab_size=batch["vocab_size"], seed=0, device="cpu")
        loss = trainer.train_step(batch["input_ids"][rows], batch["labels"][rows], lr=1e-3)
        np.savez(Path(out_dir) / f"rank{rank}.npz", loss=loss, **trainer.export_params())
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_match_one_big_batch(tokenizer, corpora, tmp_path: Path) -> None:
    train, _ = corpora
    input_ids, labels = train.batch(0, 8, SEQ_LEN)
    torch.save({"input_ids": input_ids, "labels": labels, "vocab_size": len(tokenizer)},
               tmp_path / "batch.pt")
    mp.spawn(_data_parallel_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = make_trainer(tokenizer)
    expected_loss = single.train_step(input_ids, labels, lr=1e-3)
    expected = single.export_params()
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]
    for result in ranks:
        assert float(result["loss"]) == pytest.approx(expected_loss, rel=1e-5)
        for name, array in expected.items():
            # Adam's first step is lr·sign(g) where |g| >> eps: atol is 1% of the lr.
            np.testing.assert_allclose(result[name], array, atol=1e-5)
    for name in expected:  # both ranks hold identical weights
        assert np.array_equal(ranks[0][name], ranks[1][name])


def test_weights_fingerprint_tells_equal_from_different_weights(tokenizer) -> None:
    a, b = make_trainer(tokenizer, seed=1), make_trainer(tokenizer, seed=2)
    assert a.weights_fingerprint() != b.weights_fingerprint()
    b.load_global(a.export_params())
    assert a.weights_fingerprint() == b.weights_fingerprint()
    state = a.export_params()
    name = next(iter(state))
    state[name].flat[7] = np.nextafter(state[name].flat[7], np.float32(np.inf))  # one ulp of one weight
    b.load_global(state)
    assert a.weights_fingerprint() != b.weights_fingerprint()
