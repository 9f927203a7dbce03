"""Benchmark: a site trainer's tokens/s, MFU, peak memory, measured power and sync seconds.

    .venv/bin/python experiments/bench_throughput.py --preset tiny --device cpu     # CI, seconds
    python3 experiments/bench_throughput.py --preset d20 --isolate \\
        --variant compiled-model:compile=model,micro=8 --variant fused-16:compile=1,fused=1,micro=16

Each ``--variant NAME:key=value,...`` builds a :class:`~curtail.training.loop.SiteTrainer`
and times ``--steps`` optimizer steps of ``--batch-size`` sequences after ``--warmup`` steps
(the first includes compilation), on random tokens. Keys: ``compile`` (0, 1 = loss and model
in one graph, ``model`` = the model alone with an eager loss, as before), ``fused`` (chunked
LM head + cross-entropy), ``micro`` (micro-batch rows), ``chunk`` (tokens per loss chunk),
``pad`` (MLP width padded to a multiple of this; 0 = off; default 64 on GPUs), ``sdpa``
(attention backend: ``flash``, ``cudnn``, ``efficient`` or ``math``; default: torch's choice),
``fsdp`` (1: FSDP2, ``parallelism = "fsdp"``; on one device a process group of one), ``ac``
(1: activation checkpointing) and ``fp8`` (1 or a recipe, ``rowwise``…: the decoder's linear
layers in float8, torchao).
``--world-size N`` runs each variant data parallel over N GPUs (NCCL; gloo on CPUs), one
process per GPU, the way a site of N GPUs trains (gradient all-reduce inside the step), and
reports tokens/s per GPU beside the one-GPU figure: the scaling efficiency inside a site.
``--profile DIR`` records two steps of the last variant with torch.profiler (kernel table
and Chrome trace in DIR).
Steps run with ``sync=False`` (no host wait inside the loop); the same steps with a host
sync per step are timed too. MFU counts 6·(parameters − embedding) + 12·layers·width·seq FLOPs
per token (nanochat's count, the prior system's anchor) against 989 TFLOP/s (H100/H200 dense bf16).

The sync section times one site's share of a federated round with the last variant's
trainer: device pseudo-gradient packed to bf16 (and int8, int4, int4 of the top 3 % with error
feedback: pack and decompress seconds, bytes), the averager's decompress and a two-site
Nesterov outer step, loading the new global weights; ``--isolate`` runs every variant in its
own process so peak memory is per variant.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curtail.training.averaging import make_outer_optimizer, pseudo_gradient
from curtail.training.compression import ErrorFeedback, WireFormat, compress, decompress
from curtail.training.loop import SiteTrainer
from curtail.training.model import count_parameters, get_spec
from curtail.training.power import PowerSampler

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PEAK_MEMORY_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # HBM, SXM datasheets
DEFAULT_VARIANTS = {"cpu": ["eager:compile=0"], "cuda": ["compiled:compile=1,micro=8"]}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, options = text.partition(":")
    pairs = dict(item.split("=", 1) for item in options.split(",") if item)
    unknown = set(pairs) - {"compile", "fused", "micro", "chunk", "pad", "sdpa", "fsdp", "ac", "fp8"}
    if unknown:
        raise SystemExit(f"variant {name!r}: unknown keys {sorted(unknown)}; "
                         "use compile, fused, micro, chunk, pad, sdpa, fsdp, ac, fp8")
    if pairs.get("sdpa", "flash") not in SDPA_BACKENDS:
        raise SystemExit(f"variant {name!r}: sdpa={pairs['sdpa']!r}; use one of {sorted(SDPA_BACKENDS)}")
    return name, pairs


def flops_per_token(trainer: SiteTrainer, seq_len: int) -> float:
    spec = trainer.spec
    embedding = trainer.model.get_input_embeddings().weight.numel()
    return 6 * (count_parameters(trainer.model) - embedding) + 12 * spec.num_layers * spec.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_bandwidth(device: torch.device) -> float | None:
    """The GPU's datasheet HBM bandwidth in bytes/s (None on CPUs and unknown cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((rate for key, rate in PEAK_MEMORY_BYTES_PER_S.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(preset: str, device: torch.device, options: dict[str, str]) -> SiteTrainer:
    compile_option = options.get("compile", "0")
    parallelism = "fsdp" if options.get("fsdp", "0") == "1" else "ddp"
    if parallelism == "fsdp":
        join_group_of_one(device)
    trainer = SiteTrainer(
        preset, seed=0, device=device,
        micro_batch_size=int(options["micro"]) if "micro" in options else None,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        compile_model=compile_option == "1",
        fused_cross_entropy=options.get("fused", "0") == "1",
        loss_chunk_tokens=int(options.get("chunk", 8192)),
        pad_mlp_multiple=int(options["pad"]) if "pad" in options else None,
        parallelism=parallelism, activation_checkpointing=options.get("ac", "0") == "1",
        fp8_linear=options.get("fp8", "0") != "0",
        fp8_recipe="tensorwise" if options.get("fp8", "0") in ("0", "1") else options["fp8"],
    )
    if compile_option == "model":  # the previous layout: compiled model, eager loss outside it
        compiled = torch.compile(trainer.model)

        def loss(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with trainer._autocast():
                logits = compiled(input_ids=input_ids).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

        trainer._train_loss = loss
    if "sdpa" in options:  # pin the attention backend for every call of the (compiled) loss
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[options["sdpa"]])
        inner = trainer._train_loss

        def pinned(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(backend):
                return inner(input_ids, labels)

        trainer._train_loss = pinned
    return trainer


def join_group_of_one(device: torch.device) -> None:
    """A process group of this process alone (FSDP over one device), unless one exists."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def time_variant(args: argparse.Namespace, name: str, options: dict[str, str], keep_trainer: bool = False) -> dict[str, Any]:
    device = torch.device(args.device)
    spec = get_spec(args.preset)
    seq_len = args.seq_len or spec.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = make_trainer(args.preset, device, options)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, trainer.vocab_size, (args.batch_size, seq_len + 1), generator=generator)
               for _ in range(2)]
    batch = [(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()) for tokens in batches]
    started = time.perf_counter()
    first_loss = trainer.train_step(*batch[0], lr=1e-4)
    first_step_s = time.perf_counter() - started
    for step in range(args.warmup - 1):
        trainer.train_step(*batch[step % 2], lr=1e-4)
    synchronize(device)
    _barrier()
    sampler = PowerSampler.create(device.index) if device.type == "cuda" else None
    if sampler is not None:
        sampler.start()
    started = time.perf_counter()
    losses = [trainer.train_step(*batch[step % 2], lr=1e-4, sync=False) for step in range(args.steps)]
    synchronize(device)
    async_s = time.perf_counter() - started
    power = sampler.stop() if sampler is not None else None
    step_times = []
    for step in range(args.steps):
        started = time.perf_counter()
        trainer.train_step(*batch[step % 2], lr=1e-4)  # float(): one host sync per step
        step_times.append(time.perf_counter() - started)
    profile = None
    if getattr(args, "profile", None) is not None and keep_trainer:
        profile = profile_steps(trainer, batch, args.profile)
    last_loss = float(losses[-1])
    world = _world_size()
    tokens_per_step = args.batch_size * seq_len * world  # every rank trains batch_size rows
    tokens_per_s = tokens_per_step * args.steps / async_s
    flops = flops_per_token(trainer, seq_len)
    peak = peak_flops(device)
    result = {
        "variant": name, "options": options, "preset": args.preset, "device": str(device),
        "batch_size": args.batch_size, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
        "world_size": world, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / world,
        "tokens_per_s_sync_each_step": tokens_per_step / statistics.median(step_times),
        "mfu": tokens_per_s / world * flops / peak if peak else None,
        "model_tflops": tokens_per_s * flops / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_step_s": first_step_s, "first_loss": first_loss, "last_loss": last_loss,
        "power_w": power.mean_power_w if power else None,
        "max_power_w": power.max_power_w if power else None,
        "joules_per_token": power.energy_j / (tokens_per_step * args.steps) if power else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if profile is not None:
        result["profile"] = profile
    if keep_trainer:
        result["_trainer"] = trainer
    return result


def profile_steps(trainer: SiteTrainer, batch: list[tuple[torch.Tensor, torch.Tensor]], folder: Path) -> dict[str, Any]:
    """Two steps under torch.profiler: the kernel table (by device time) and a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(2):
            trainer.train_step(*batch[step % 2], lr=1e-4)
        synchronize(trainer.device)
    sort_by = "cuda_time_total" if trainer.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40)
    (folder / "kernels.txt").write_text(table)
    prof.export_chrome_trace(str(folder / "trace.json"))
    return {"table": str(folder / "kernels.txt"), "trace": str(folder / "trace.json")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_parallel_worker(rank: int, world: int, args: argparse.Namespace, name: str, options: dict[str, str],
                          port: int, results: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        local = copy.copy(args)
        local.device, local.profile = (f"cuda:{rank}" if cuda else "cpu"), None
        result = time_variant(local, name, options)
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()


def time_data_parallel(args: argparse.Namespace, name: str, options: dict[str, str], world: int) -> dict[str, Any]:
    """One variant over ``world`` processes (one GPU each): a site's data parallelism."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(_data_parallel_worker, args=(world, args, name, options, _free_port(), results), nprocs=world)
    result = results.get()
    result["variant"] = f"{name}-x{world}"
    return result


COMPRESSED_FORMATS = {
    "int8": WireFormat("int8"), "int4": WireFormat("int4"), "int4_top3pct": WireFormat("int4", topk_fraction=0.03),
}


def time_sync(trainer: SiteTrainer) -> dict[str, float]:
    """One site's share of a federated round's hand-off, in seconds, plus the old path."""
    timings: dict[str, float] = {}

    def clock(key: str, fn: Any) -> Any:
        synchronize(trainer.device)
        started = time.perf_counter()
        value = fn()
        synchronize(trainer.device)
        timings[key] = time.perf_counter() - started
        return value

    start = clock("export_params_s", trainer.export_params)
    clock("load_global_s", lambda: trainer.load_global(start))
    with torch.no_grad():  # a round's worth of change
        for param in trainer.model.parameters():
            param.add_(torch.randn_like(param), alpha=1e-3)
    packed = clock("pseudo_gradient_bf16_on_device_s", lambda: trainer.compressed_pseudo_gradient(start, "bf16"))
    site_params = trainer.export_params()
    delta = clock("pseudo_gradient_host_s", lambda: pseudo_gradient(start, site_params))
    clock("compress_bf16_host_s", lambda: compress(delta, "bf16"))
    mean = clock("decompress_s", lambda: decompress(packed))
    other = {name: value * 0.5 for name, value in mean.items()}
    global_params = {name: np.array(value, dtype=np.float32) for name, value in start.items()}
    outer = make_outer_optimizer("nesterov")
    clock("outer_step_2_sites_s", lambda: outer.step(global_params, {"a": mean, "b": other}, {"a": 3, "b": 1}))
    clock("digest_sha256_s", lambda: _digest(global_params))
    timings["bytes_bf16"] = float(packed.num_bytes)
    for name, wire in COMPRESSED_FORMATS.items():  # lossy wire formats with error feedback (compression.py)
        trainer.error_feedback = ErrorFeedback()
        lossy = clock(f"pack_{name}_on_device_s", lambda wire=wire: trainer.compressed_pseudo_gradient(start, wire))
        clock(f"decompress_{name}_s", lambda lossy=lossy: decompress(lossy))
        timings[f"bytes_{name}"] = float(lossy.num_bytes)
    trainer.error_feedback = ErrorFeedback()
    timings["site_sync_s"] = (timings["pseudo_gradient_bf16_on_device_s"] + timings["decompress_s"]
                              + timings["outer_step_2_sites_s"] + timings["load_global_s"])
    timings["share_of_600s_round"] = timings["site_sync_s"] / 600.0
    return timings


def _digest(params: dict[str, np.ndarray]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(params):
        hasher.update(np.ascontiguousarray(params[name]).tobytes())
    return hasher.hexdigest()[:16]


def matmul_alignment(device: torch.device) -> dict[str, float]:
    """bf16 TFLOP/s of the d20 MLP's up projection at its width (3413) and padded (3456)."""
    out = {}
    for width in (3413, 3456):
        a = torch.randn(16384, 1280, device=device, dtype=torch.bfloat16)
        b = torch.randn(1280, width, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        synchronize(device)
        started = time.perf_counter()
        for _ in range(20):
            a @ b
        synchronize(device)
        out[f"mlp_up_{width}_tflops"] = 20 * 2 * 16384 * 1280 * width / (time.perf_counter() - started) / 1e12
        bt = torch.randn(width, 1280, device=device, dtype=torch.bfloat16)
        h = torch.randn(16384, width, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            h @ bt
        synchronize(device)
        started = time.perf_counter()
        for _ in range(20):
            h @ bt
        synchronize(device)
        out[f"mlp_down_{width}_tflops"] = 20 * 2 * 16384 * 1280 * width / (time.perf_counter() - started) / 1e12
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "d12", "d20", "d48"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", action="append", default=None, help="NAME:key=value,... (repeatable)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32 on GPU, 4 on CPU)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-sync", action="store_true", help="skip the sync section")
    parser.add_argument("--matmul", action="store_true", help="also time the MLP matmul at width 3413 vs 3456")
    parser.add_argument("--isolate", action="store_true", help="each variant in its own process")
    parser.add_argument("--world-size", type=int, default=1,
                        help="also run each variant data parallel over this many GPUs (CPU: gloo processes)")
    parser.add_argument("--profile", type=Path, default=None, help="profile two steps of the last variant into DIR")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 4)
    args.steps = args.steps or (6 if device.type == "cuda" else 3)
    args.warmup = max(args.warmup, 1)
    variants = [parse_variant(text) for text in (args.variant or DEFAULT_VARIANTS[device.type])]
    results: dict[str, Any] = {"torch": torch.__version__, "variants": []}
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass
    trainer = None
    for index, (name, options) in enumerate(variants):
        last = index == len(variants) - 1
        # data parallel first: the one-GPU run of the last variant keeps its trainer (GPU memory)
        parallel = time_data_parallel(args, name, options, args.world_size) if args.world_size > 1 else None
        if args.isolate and not (last and not args.no_sync):
            command = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--world-size", "1",
                       "--variant", f"{name}:" + ",".join(f"{k}={v}" for k, v in options.items()),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--no-sync", "--json"]
            if args.seq_len:
                command += ["--seq-len", str(args.seq_len)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                results["variants"].append({"variant": name, "options": options, "error": done.stderr[-500:]})
            else:
                results["variants"].extend(json.loads(done.stdout)["variants"])
        else:
            result = time_variant(args, name, options, keep_trainer=last)
            trainer = result.pop("_trainer", None)
            results["variants"].append(result)
        if not args.json:
            print(json.dumps(results["variants"][-1]), flush=True)
        if parallel is not None:
            single = results["variants"][-1]
            if "tokens_per_s" in single:
                parallel["scaling_efficiency"] = parallel["tokens_per_s_per_device"] / single["tokens_per_s"]
            results["variants"].append(parallel)
            if not args.json:
                print(json.dumps(parallel), flush=True)
    if not args.no_sync and trainer is not None:
        results["sync"] = time_sync(trainer)
    if args.matmul and device.type == "cuda":
        results["matmul"] = matmul_alignment(device)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return results


def print_table(results: dict[str, Any]) -> None:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"{'variant':<22}{'tok/s':>10}{'per GPU':>10}{'scaling':>9}{'tok/s sync':>12}{'MFU':>7}{'peak GiB':>10}"
          f"{'first s':>9}{'W':>7}")
    for row in results["variants"]:
        if "error" in row:
            print(f"{row['variant']:<22} failed: {row['error'][-120:]!r}")
            continue
        print(f"{row['variant']:<22}{row['tokens_per_s']:>10.0f}{row['tokens_per_s_per_device']:>10.0f}"
              f"{fmt(row.get('scaling_efficiency'), '.1%'):>9}{row['tokens_per_s_sync_each_step']:>12.0f}"
              f"{fmt(row['mfu'], '.1%'):>7}{fmt(row['peak_memory_gib'], '.1f'):>10}"
              f"{row['first_step_s']:>9.1f}{fmt(row['power_w'], '.0f'):>7}")
    for key, value in results.get("sync", {}).items():
        print(f"{key:>34}: {value:.4g}")
    for key, value in results.get("matmul", {}).items():
        print(f"{key:>34}: {value:.1f}")


if __name__ == "__main__":
    main()
