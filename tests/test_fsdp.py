"""FSDP2 inside a site, on two gloo ranks (CPU processes): the same training as plain data
parallelism, with each rank holding only its rows of every parameter and moment."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp
from fsdp_ranks import STEPS, train_both_ways


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(train_both_ways, args=(2, port, str(out)), nprocs=2, join=True)
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]


def test_fsdp_trains_as_ddp_does_over_20_steps(ranks) -> None:
    ddp, fsdp = ranks[0]["ddp"], ranks[0]["fsdp"]
    assert len(fsdp["losses"]) == STEPS and fsdp["losses"][-1] < fsdp["losses"][0] - 0.5  # it learns
    np.testing.assert_allclose(fsdp["losses"], ddp["losses"], rtol=1e-4)
    for name, array in ddp["params"].items():
        np.testing.assert_allclose(fsdp["params"][name], array, atol=1e-5, err_msg=name)
    assert ranks[1]["fsdp"]["losses"] == fsdp["losses"]  # the mean over ranks, on every rank


def test_each_rank_holds_and_sends_only_its_rows(ranks) -> None:
    params = ranks[0]["fsdp"]["params"]
    total = sum(array.size for array in params.values())
    moments = [rank["fsdp"]["local_moment_numel"] for rank in ranks]
    assert sum(moments) == total and max(moments) < 0.6 * total  # each rank's AdamW holds about half
    for name, array in params.items():
        rows = [rank["fsdp"]["rows"][name] for rank in ranks]
        assert rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == array.shape[0]
        # the pseudo-gradient's rows of both ranks make up the whole tensor's (start − now)
        joined = np.concatenate([rank["fsdp"]["pseudo_gradient_rows"][name] for rank in ranks])
        np.testing.assert_allclose(joined, ranks[0]["fsdp"]["start"][name] - array, atol=1e-6, err_msg=name)


def test_the_fingerprint_is_the_whole_models_and_an_optimizer_round_trip_is_exact(ranks) -> None:
    for rank in ranks:
        trained, restored = rank["fsdp"]["round_trip"]
        assert trained == restored  # the same step from the saved AdamW shard
    assert ranks[0]["fsdp"]["fingerprint"] == ranks[1]["fsdp"]["fingerprint"]
