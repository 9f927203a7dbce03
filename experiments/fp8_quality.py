"""Float8 against bf16 on the same real tokens: the loss curve, tokens/s and where a step's time goes.

    python3 experiments/fp8_quality.py --shards .cache/pyc-small --preset d20 --steps 300 \\
        --batch-size 16 --micro 16 --output-dir .cache/fp8            # the H200 measurement
    .venv/bin/python experiments/fp8_quality.py --text data/text/tinyshakespeare.txt \\
        --preset tiny --steps 30 --batch-size 4 --output-dir /tmp/fp8 # CPU, seconds

Each precision (``--precisions``, default ``bf16 fp8``; ``fp8-rowwise`` and
``fp8-rowwise_with_gw_hp`` pick torchao's other scaling recipes) builds a fresh
:class:`~curtail.training.loop.SiteTrainer` from the same seed (compiled on GPUs, bf16 autocast,
``fp8_linear`` for the fp8 ones) and trains ``--steps`` optimizer steps on the same batches: consecutive
windows of the shard folder's training tokens (``curtail prepare-data``) or of a text file
tokenised with a byte-level BPE, all moved to the device before the clock starts. The learning
rate follows the runs' warmup / constant / warmdown schedule. Reported per precision: the loss
at every step (``losses.csv``), the mean loss of the last ``--tail`` steps and its gap to the
first precision's, tokens/s and MFU over the steps after ``--warmup`` (the first includes
compilation), peak memory, the board's power and joules per token (NVML), and, with ``--profile``,
two steps under ``torch.profiler`` split into matmuls, attention, fused elementwise kernels
(Triton), the optimizer and the rest, against the steps' wall time (``profile_<precision>.txt``);
for each float8 run after a bf16 one, what its casts cost (its Triton time over bf16's), the
least they could cost at the card's memory bandwidth, and the tokens/s its step would reach
there (``ceiling_tokens_per_s``). ``--parallelism fsdp`` trains through FSDP2 over the one
device: bf16 compute weights with float32 master weights, where DDP's path casts at each use.
``--compile-mode max-autotune-no-cudagraphs`` compiles every precision with Inductor's autotuning.
``--seeds 0 1 2`` trains every precision from each seed (initial weights; the batches stay the
same) and compares each run with the first precision's from its seed: the mean and range of those
gaps tell float8's effect on the loss from the divergence any two runs show (profiles: first seed
only). ``summary.json`` records the SHA-256 of the tokens trained on, so runs on machines with
different corpora are told apart.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_throughput import (
    flops_per_token,
    join_group_of_one,
    peak_flops,
    peak_memory_bandwidth,
    synchronize,
)

from curtail.training.float8 import FLOAT8_RECIPES, cast_traffic_bytes
from curtail.training.loop import COMPILE_MODES, SiteTrainer
from curtail.training.power import PowerSampler
from curtail.training.schedule import LRSchedule

PRECISIONS = ["bf16", "fp8", *(f"fp8-{recipe}" for recipe in FLOAT8_RECIPES if recipe != "tensorwise")]
ACHIEVABLE_BANDWIDTH = 0.92  # of the datasheet's, for large elementwise kernels (torchao's roofline model)
TRITON = "triton (fused elementwise, norms, casts)"
OP_GROUPS = (  # (group, substrings of the aten operators whose kernels make it up), first match wins
    ("matmul", ("aten::mm", "aten::_scaled_mm", "aten::addmm", "aten::bmm")),
    ("attention", ("attention", "flash")),
    ("optimizer", ("adam", "_foreach")),
)


def load_tokens(args: argparse.Namespace, needed: int) -> tuple[np.ndarray, int]:
    """``needed`` training tokens and the vocabulary size they were cut with."""
    if args.shards is not None:
        from curtail.training.shards import ShardedTokens

        corpus = ShardedTokens.open(args.shards).train()
        if len(corpus) < needed:
            raise SystemExit(f"{args.shards}: {len(corpus):,} training tokens, the steps need {needed:,}; "
                             "use fewer --steps or a smaller --batch-size")
        return np.asarray(corpus[0:needed], dtype=np.int64), corpus.manifest.vocab_size
    from curtail.training.data import tokenize_files
    from curtail.training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([args.text], vocab_size=args.vocab_size)
    tokens = np.asarray(tokenize_files([args.text], tokenizer), dtype=np.int64)
    repeats = -(-needed // len(tokens))
    return np.tile(tokens, repeats)[:needed], len(tokenizer)


def train(precision: str, seed: int, args: argparse.Namespace, batches: list[tuple[torch.Tensor, torch.Tensor]],
          vocab_size: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(seed)
    if args.parallelism == "fsdp":
        join_group_of_one(device)
    recipe = precision.removeprefix("fp8-") if precision.startswith("fp8-") else "tensorwise"
    trainer = SiteTrainer(args.preset, vocab_size, seed=seed, device=device, micro_batch_size=args.micro,
                          autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                          compile_model=device.type == "cuda" and not args.eager, fp8_linear=precision != "bf16",
                          compile_mode=args.compile_mode, fp8_recipe=recipe, parallelism=args.parallelism)
    tokens_per_step = batches[0][0].numel()
    schedule = LRSchedule.from_fractions(args.peak_lr, tokens_per_step * len(batches), 0.05, 0.3, 0.1)
    losses: list[torch.Tensor] = []
    sampler = PowerSampler.create(device.index) if device.type == "cuda" else None
    started = timed_from = time.perf_counter()
    for step, (inputs, labels) in enumerate(batches):
        if step == args.warmup:
            synchronize(device)
            timed_from = time.perf_counter()
            if sampler is not None:
                sampler.start()
        losses.append(trainer.train_step(inputs, labels, schedule.lr_at(step * tokens_per_step), sync=False))
    synchronize(device)
    ended = time.perf_counter()
    power = sampler.stop() if sampler is not None else None
    timed_steps = len(batches) - args.warmup
    tokens_per_s = tokens_per_step * timed_steps / (ended - timed_from)
    peak = peak_flops(device)
    result = {
        "precision": precision,
        "seed": seed,
        "float8_layers": len(trainer.float8_layers),
        "losses": [float(loss) for loss in losses],
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(trainer, batches[0][0].shape[1]) / peak if peak else None,
        "wall_s": ended - started,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "power_w": power.mean_power_w if power else None,
        "joules_per_token": power.energy_j / (tokens_per_step * timed_steps) if power else None,
    }
    if args.profile and seed == args.seeds[0]:  # one profile per precision
        result["profile"] = profile(trainer, batches, args.output_dir / f"profile_{precision}.txt")
        if trainer.float8_layers:
            result["profile"]["float8_cast_roofline_s"] = cast_roofline_s(trainer, batches[0][0].shape, recipe, args)
    return result


def cast_roofline_s(trainer: SiteTrainer, batch_shape: torch.Size, recipe: str,
                    args: argparse.Namespace) -> list[float] | None:
    """The least and the most device seconds the float8 casts of the two profiled steps can take
    at the card's bandwidth (torchao's model, :func:`~curtail.training.float8.cast_traffic_bytes`):
    casts fused into their producers with shared inputs cast once, and every cast its own kernels.
    None where the card's bandwidth is unknown (CPUs)."""
    bandwidth = peak_memory_bandwidth(trainer.device)
    if bandwidth is None:
        return None
    rows, seq_len = batch_shape
    micro = min(args.micro or rows, rows)
    passes = 2 * -(-rows // micro)  # forward + backward passes of micro-batches in two steps
    # FSDP computes in bf16; DDP's autocast leaves the float32 weights and the norm's output in float32
    element_bytes = 2 if args.parallelism == "fsdp" else 4
    bounds = [cast_traffic_bytes(trainer.model, micro * seq_len, recipe, weight_bytes=element_bytes,
                                 norm_output_bytes=element_bytes, fused_with_producer=fused,
                                 shared_inputs_once=fused) for fused in (True, False)]
    return [passes * traffic / (bandwidth * ACHIEVABLE_BANDWIDTH) for traffic in bounds]


def add_ceilings(results: list[dict[str, Any]], tokens_per_step: int) -> None:
    """For each profiled float8 run: its casts' measured cost (its Triton time over the first,
    bf16, run's of its seed) and the tokens/s its step would reach with the casts at the
    bandwidth floor."""
    for result in results:
        baseline = baseline_of(result, results)
        base, timings = baseline.get("profile"), result.get("profile") or {}
        if result is baseline or base is None or not timings.get("float8_cast_roofline_s"):
            continue
        measured_s = timings[TRITON] - base[TRITON]
        floor_s = timings["float8_cast_roofline_s"][0]
        result["float8_casts_measured_s"] = measured_s
        result["ceiling_tokens_per_s"] = 2 * tokens_per_step / (timings["wall_s"] - measured_s + floor_s)


def profile(trainer: SiteTrainer, batches: list[tuple[torch.Tensor, torch.Tensor]], path: Path) -> dict[str, float]:
    """Device seconds per kernel group over two steps, and the steps' wall seconds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    synchronize(trainer.device)
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        for inputs, labels in batches[:2]:
            trainer.train_step(inputs, labels, lr=1e-5, sync=False)
        synchronize(trainer.device)
        wall_s = time.perf_counter() - started
    # operators carry the device time of the kernels they launch (matmuls, attention, the
    # optimizer); what the compiled graphs launch themselves is Triton (norms, RoPE, SiLU, casts)
    groups = {name: 0.0 for name, _ in OP_GROUPS} | {TRITON: 0.0, "other kernels": 0.0}
    kernels_s = 0.0
    for event in prof.key_averages():
        device_s = (getattr(event, "self_device_time_total", 0) or 0) / 1e6
        if not device_s:
            continue
        if "CUDA" in str(getattr(event, "device_type", "")):  # a kernel
            kernels_s += device_s
            if event.key.startswith("triton"):
                groups[TRITON] += device_s
            continue
        group = next((group for group, keys in OP_GROUPS if any(key in event.key for key in keys)), None)
        if group is not None:
            groups[group] += device_s
    groups["other kernels"] = max(0.0, kernels_s - sum(groups.values()))
    busy = sum(groups.values())
    summary = {"wall_s": wall_s, "device_busy_s": busy, **groups}
    lines = [f"two steps: {wall_s:.3f} s wall, {busy:.3f} s of kernels ({busy / wall_s:.0%} busy)"]
    lines += [f"  {group:<42}{seconds:8.3f} s  {seconds / wall_s:6.1%}" for group, seconds in groups.items()]
    sort_by = "cuda_time_total" if trainer.device.type == "cuda" else "cpu_time_total"
    path.write_text("\n".join(lines) + "\n\n" + prof.key_averages().table(sort_by=sort_by, row_limit=30))
    print("\n".join(lines))
    return summary


def baseline_of(result: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run ``result`` is compared with: the first precision's run from the same seed."""
    return next(r for r in results if r["seed"] == result["seed"])


def tail_gaps(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per precision after the first: its tail gaps over the seeds trained so far, their mean and
    range (one seed's gap mixes float8's effect with the trajectories' divergence)."""
    gaps: dict[str, list[float]] = {}
    for result in results:
        if result is not baseline_of(result, results):
            gaps.setdefault(result["precision"], []).append(result["tail_gap"])
    return {precision: {"seeds": len(values), "mean": float(np.mean(values)), "min": min(values),
                        "max": max(values)} for precision, values in gaps.items()}


def write(results: list[dict[str, Any]], args: argparse.Namespace, device: torch.device, seq_len: int,
          vocab_size: int, corpus_sha256: str) -> dict[str, Any]:
    """losses.csv and summary.json of the runs so far; each run's tail gap against the first
    precision's run from its seed."""
    for result in results:  # a run's baseline comes first in results, so its tail loss is there
        result["tail_loss"] = float(np.mean(result["losses"][-args.tail:]))
        result["tail_gap"] = result["tail_loss"] / baseline_of(result, results)["tail_loss"] - 1
    add_ceilings(results, args.batch_size * seq_len)
    several_seeds = len(args.seeds) > 1
    with open(args.output_dir / "losses.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *(f"loss_{r['precision']}" + (f"_seed{r['seed']}" if several_seeds else "")
                                   for r in results)])
        writer.writerows([step, *(r["losses"][step] for r in results)] for step in range(args.steps))
    summary = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "parallelism": args.parallelism, "compile_mode": args.compile_mode,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": seq_len,
        "vocab_size": vocab_size, "tokens_per_step": args.batch_size * seq_len,
        "corpus_sha256": corpus_sha256,  # of the tokens trained on: runs on other machine images may differ
        "seeds": args.seeds, "tail_gaps": tail_gaps(results),
        "runs": [{k: v for k, v in r.items() if k != "losses"} for r in results],
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", type=Path, help="a shard folder of curtail prepare-data")
    source.add_argument("--text", type=Path, help="a text file, tokenised here")
    parser.add_argument("--vocab-size", type=int, default=2048, help="with --text: the BPE's vocabulary")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "d12", "d20", "d48"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=PRECISIONS,
                        help="fp8: the tensorwise recipe; fp8-RECIPE another (curtail.training.float8)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train each precision from each of these seeds (the same batches); gaps per seed")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--micro", type=int, default=None, help="sequences per forward/backward")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument("--peak-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of tokens/s (compilation)")
    parser.add_argument("--tail", type=int, default=50, help="steps whose mean loss is compared")
    parser.add_argument("--eager", action="store_true", help="no torch.compile on GPUs")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile's mode (max-autotune-no-cudagraphs: tuned Triton templates and kernels)")
    parser.add_argument("--parallelism", choices=["ddp", "fsdp"], default="ddp",
                        help="fsdp: FSDP2 over this one device (bf16 compute weights, float32 master)")
    parser.add_argument("--profile", action="store_true", help="profile two steps of each precision")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps or not 0 < args.tail <= args.steps:
        raise SystemExit("need 0 <= --warmup < --steps and 0 < --tail <= --steps")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    from curtail.training.model import get_spec

    seq_len = args.seq_len or get_spec(args.preset).seq_len
    tokens, vocab_size = load_tokens(args, args.steps * args.batch_size * seq_len + 1)
    batches = []
    for step in range(args.steps):
        window = torch.from_numpy(tokens[step * args.batch_size * seq_len:][: args.batch_size * seq_len + 1])
        batches.append((window[:-1].view(args.batch_size, seq_len).to(device),
                        window[1:].view(args.batch_size, seq_len).to(device)))
    corpus_sha256 = hashlib.sha256(np.ascontiguousarray(tokens)).hexdigest()  # the buffer, no copy
    results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for seed in args.seeds:
        for precision in args.precisions:  # the files are rewritten after each, so a failing one keeps the others
            results.append(train(precision, seed, args, batches, vocab_size, device))
            summary = write(results, args, device, seq_len, vocab_size, corpus_sha256)
    for r in summary["runs"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"{r['precision']:>5} seed {r['seed']}: {r['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6}  tail loss {r['tail_loss']:.4f} "
              f"({r['tail_gap']:+.2%})  float8 layers {r['float8_layers']}  J/token {r.get('joules_per_token', '-')}")
        if "ceiling_tokens_per_s" in r:
            floor_s, unfused_s = r["profile"]["float8_cast_roofline_s"]
            print(f"       float8 casts: {r['float8_casts_measured_s'] * 1e3:.1f} ms measured over two steps, "
                  f"{floor_s * 1e3:.1f}-{unfused_s * 1e3:.1f} ms at the bandwidth floor; "
                  f"at the floor: {r['ceiling_tokens_per_s']:,.0f} tok/s")
    for precision, gap in summary["tail_gaps"].items():
        print(f"{precision} against {args.precisions[0]}, tail loss over {gap['seeds']} seed(s): "
              f"{gap['mean']:+.2%} (from {gap['min']:+.2%} to {gap['max']:+.2%})")
    return summary


if __name__ == "__main__":
    main()
