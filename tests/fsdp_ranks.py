"""What each rank of a 2-rank gloo group runs for ``tests/test_fsdp.py`` (a module of its own:
the spawned ranks import it by name)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TEXT = Path(__file__).resolve().parents[1] / "data" / "text" / "tinyshakespeare.txt"
BATCH_SIZE, SEQ_LEN, STEPS = 4, 64, 20


def train_both_ways(rank: int, world: int, port: int, out_dir: str) -> None:
    """The same 20 steps of the tiny model under "ddp" and "fsdp" (same seed, same rows per
    rank); then the weights in and out, the pseudo-gradient, the fingerprint and an optimizer
    round trip under FSDP. Writes ``rank<r>.pkl``."""
    from curtail.training.data import TokenCorpus
    from curtail.training.loop import SiteTrainer
    from curtail.training.model import tiny

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = np.frombuffer(TEXT.read_bytes()[:200_000], dtype=np.uint8).astype(np.uint16)
    corpus = TokenCorpus(data, "train")
    step_tokens = BATCH_SIZE * SEQ_LEN

    def make(parallelism: str, fused: bool = False) -> SiteTrainer:
        return SiteTrainer(tiny(), vocab_size=256, seed=7, device="cpu", parallelism=parallelism,
                           fused_cross_entropy=fused, loss_chunk_tokens=100)

    def train(trainer: SiteTrainer, first: int, steps: int) -> list[float]:
        return [trainer.train_step(*corpus.batch((first + step) * world * step_tokens + rank * step_tokens,
                                                 BATCH_SIZE, SEQ_LEN), lr=3e-3) for step in range(steps)]

    result: dict[str, object] = {}
    for parallelism in ("ddp", "fsdp"):  # the chunked LM head + loss (under FSDP: inside the root's call)
        fused = make(parallelism, fused=True)
        result[f"{parallelism}_fused"] = {"losses": train(fused, 0, STEPS), "params": fused.export_params(),
                                          "heldout": fused.evaluate(corpus, 2, BATCH_SIZE, SEQ_LEN)}
    for parallelism in ("ddp", "fsdp"):
        trainer = make(parallelism)
        start = trainer.export_params()
        result[parallelism] = {"losses": train(trainer, 0, STEPS), "fingerprint": trainer.weights_fingerprint(),
                               "params": trainer.export_params()}
        if parallelism == "fsdp":
            packed = trainer.compressed_pseudo_gradient(start, "fp32")
            from curtail.training.compression import decompress

            result["fsdp"]["start"] = start
            result["fsdp"]["rows"] = {name: (rows.start, rows.stop) for name, rows in trainer._rows.items()}
            result["fsdp"]["pseudo_gradient_rows"] = decompress(packed)
            # an optimizer round trip: a fresh trainer with these weights and this AdamW takes the same step
            state = trainer.optimizer_state_dict()
            fresh = make("fsdp")
            fresh.load_global(result["fsdp"]["params"])
            fresh.load_optimizer_state_dict(state)
            train(trainer, STEPS, 1)
            train(fresh, STEPS, 1)
            result["fsdp"]["round_trip"] = (trainer.weights_fingerprint(), fresh.weights_fingerprint())
            result["fsdp"]["local_moment_numel"] = sum(
                int(v.numel()) for s in state["optimizer"]["state"].values() for k, v in s.items() if k == "exp_avg")
    (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()
