"""The throughput benchmark's CPU path (tiny preset): one command CI can run; no wall-time asserts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curtail.training.loop import SiteTrainer, linear_cross_entropy, pad_mlp_width
from curtail.training.power import PowerSampler

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    # importable by name: the data-parallel ranks are spawned processes that import it again
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    return importlib.import_module("bench_throughput")


def test_tiny_cpu_benchmark_reports_every_number(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "bench.json"
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "4",
                         "--variant", "eager:compile=0", "--variant", "fused:fused=1,micro=2,chunk=100",
                         "--out", str(out), "--json"])
    assert json.loads(out.read_text())["variants"][0]["variant"] == "eager"
    eager, fused = result["variants"]
    for row in (eager, fused):
        assert row["tokens_per_step"] == 4 * 64
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_sync_each_step"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None and row["power_w"] is None  # CPU
        assert np.isfinite(row["last_loss"])
    # Same weights, same batches: the fused chunked loss is the same function.
    assert fused["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-5)
    assert fused["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-4)
    sync = result["sync"]
    assert sync["bytes_bf16"] > 0 and 0 < sync["share_of_600s_round"] < 1
    assert sync["site_sync_s"] == pytest.approx(
        sync["pseudo_gradient_bf16_on_device_s"] + sync["decompress_s"] + sync["outer_step_2_sites_s"]
        + sync["load_global_s"])


def test_linear_cross_entropy_matches_the_plain_loss_and_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (300,), generator=generator)
    labels[7] = -100
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
    (reference * 0.5).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=64)
    (loss * 0.5).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-7)


def test_padded_mlp_is_the_same_model() -> None:
    plain = SiteTrainer("tiny", seed=0, device="cpu", pad_mlp_multiple=0)
    padded = SiteTrainer("tiny", seed=0, device="cpu", pad_mlp_multiple=64)
    assert pad_mlp_width(torch.nn.Linear(2, 2)) == 0
    tokens = torch.randint(0, plain.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss_plain = plain.train_step(tokens[:, :-1], tokens[:, 1:], lr=1e-3)
        loss_padded = padded.train_step(tokens[:, :-1], tokens[:, 1:], lr=1e-3, sync=False)
    assert isinstance(loss_padded, torch.Tensor)
    assert float(loss_padded) == pytest.approx(loss_plain, rel=1e-6)
    a, b = plain.export_params(), padded.export_params()
    assert {name: v.shape for name, v in a.items()} == {name: v.shape for name, v in b.items()}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_device_pseudo_gradient_equals_the_host_path() -> None:
    from curtail.training.averaging import pseudo_gradient
    from curtail.training.compression import compress

    trainer = SiteTrainer("tiny", seed=0, device="cpu")
    start = trainer.export_params()
    trainer.load_global(start)
    tokens = torch.randint(0, trainer.vocab_size, (4, 65), generator=torch.Generator().manual_seed(2))
    trainer.train_step(tokens[:, :-1], tokens[:, 1:], lr=1e-3)
    expected = compress(pseudo_gradient(start, trainer.export_params()), "bf16")
    for reference in (start, dict(start)):  # the kept device copy, and an upload of another mapping
        packed = trainer.compressed_pseudo_gradient(reference, "bf16")
        assert packed.dtype == "bf16" and set(packed.arrays) == set(expected.arrays)
        for name, array in expected.arrays.items():
            np.testing.assert_array_equal(packed.arrays[name], array)
    with pytest.raises(ValueError, match="missing"):
        trainer.compressed_pseudo_gradient({"nope": np.zeros(1, np.float32)})


def test_power_sampler_is_none_without_nvml_or_measures_watts() -> None:
    sampler = PowerSampler.create()
    if sampler is None:  # CPU machines: callers keep the modelled power
        return
    sampler.start()
    reading = sampler.stop()
    assert reading.mean_power_w > 0 and reading.energy_j >= 0


def test_data_parallel_benchmark_matches_one_process(tmp_path: Path) -> None:
    """Two gloo ranks that see the same batch average identical gradients: the same losses as
    one process, twice the tokens per step; the profile's kernel table is written."""
    bench = load_bench()
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2",
                         "--variant", "eager:compile=0", "--world-size", "2", "--no-sync",
                         "--profile", str(tmp_path / "profile"), "--json"])
    single, parallel = result["variants"]
    assert (single["world_size"], parallel["world_size"]) == (1, 2)
    assert parallel["tokens_per_step"] == 2 * single["tokens_per_step"]
    assert parallel["tokens_per_s_per_device"] == pytest.approx(parallel["tokens_per_s"] / 2)
    assert parallel["last_loss"] == pytest.approx(single["last_loss"], rel=1e-5)
    assert parallel["scaling_efficiency"] > 0
    assert "aten::mm" in (tmp_path / "profile" / "kernels.txt").read_text()
