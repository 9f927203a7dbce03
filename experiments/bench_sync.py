"""Benchmark: how much of a federated round a site spends not training (sync and hand-off).

    .venv/bin/python experiments/bench_sync.py            # small preset, 2 sites, CPU
    .venv/bin/python experiments/bench_sync.py --preset tiny --rounds 4   # quicker
    .venv/bin/python experiments/bench_sync.py --transfer-dtype int4 --link-mbit 100 --latency-ms 50
    .venv/bin/python experiments/bench_sync.py --transfer-dtype int4 --broadcast-dtype int4 --link-mbit 100 \
        --latency-ms 50 --overlap                   # sites train on while their syncs travel
    .venv/bin/python experiments/bench_sync.py --transfer-dtype int4 --broadcast-dtype int4 --link-mbit 100 \
        --latency-ms 50 --overlap --fragments 4     # in 4 fragments staggered over the round
    python experiments/bench_sync.py --preset d20 --rounds 5 --transfer-dtype int4 --broadcast-dtype int4 \
        --overlap --speedup 10 --link-mbit 1000 --latency-ms 5   # one GPU (docs/BENCHMARKS.md)

Two sites train federated the whole time (always_on policy) on a local Ray cluster for
``--rounds`` rounds of ``--steps-per-round`` steps. From the run's ``timings.csv``: a round's
wall time runs from one ``round_start`` to the next (all syncs, outer steps, weight loads and
command round trips included); a site's training time is the compute its workers reported
for its train commands in that round. Not-training share = 1 − training / round wall time.
The fixed per-sync cost is also reported and projected onto the prior system's 600-s rounds.
With ``--link-mbit`` every transfer is held for its time on an emulated link of that bandwidth
and ``--latency-ms`` (``[training] emulate_link``); ``--transfer-dtype`` / ``--topk-fraction``
pick the wire format; ``--overlap`` overlaps each sync with the next round's training
(``[execution] overlap_sync``), ``--fragments`` in staggered fragments (``[training]
sync_fragments``). Bytes sent and received per sync and each site's blocked
seconds per round (submit, load, merge, publish, waits for a round to land) come from the run's
summary.

``--preset d20`` runs the 561M-parameter model on a GPU: both sites share one GPU (half each),
compiled, on the real-time clock at ``--speedup`` times the trace (a 600-s round lasts 600 /
speedup wall seconds; scale the link by the same factor to keep the transfer's share of a
round), ``sync_s = 0`` (only measured pauses).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


# the d20 model on one GPU shared by both sites (a real-time clock: the GPU sets the pace)
D20_TRAINING = {"vocab_size": 65536, "micro_batch_size": 16, "compile_model": True, "workers_per_site": 1,
                "cpus_per_worker": 1, "gpus_per_worker": 0.5, "torch_threads_per_worker": 4,
                "command_timeout_s": 900, "checkpoint_inner_optimizer": False, "eval_batches": 1,
                "eval_batch_size": 1}


def experiment(preset: str, rounds: int, steps_per_round: int, batch_size: int, transfer: dict | None = None,
               link: dict | None = None, overlap: bool = False, speedup: float | None = None) -> dict:
    """The two-site always-on run; ``transfer``: ``[training]`` transfer keys; ``link``:
    ``[execution]`` link keys, emulated (every transfer held for its time on the link);
    ``speedup``: the real-time clock at that speed (else the virtual clock)."""
    seq_len = {"tiny": 64, "small": 128, "d20": 2048}[preset]
    step_tokens = batch_size * seq_len
    step_s = 600.0 / steps_per_round
    site = {"training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": step_tokens / step_s}
    training = {"vocab_size": 2048 if preset == "small" else 512, "eval_batches": 2, "eval_batch_size": 2}
    if preset == "d20":
        training = dict(D20_TRAINING)
    if speedup is not None:  # the wall decides the steps: a checkpoint at most every 4 rounds
        training.update(clock="realtime", realtime_speedup=speedup, checkpoint_interval_s=2400)
    return {
        "name": "bench-sync",
        "token_budget": 2 * rounds * steps_per_round * step_tokens,
        "traces": [{"path": str(ROOT / "data/traces/watttime_moer_2026-01-11_4regions.csv")}],
        "execution": {"round_s": 600, "sync_s": 0 if preset == "d20" else 5, "group_start_s": 0,
                      "join": "immediate", "overlap_sync": overlap, **(link or {})},
        "training": {"preset": preset, "corpus": [str(ROOT / "data/text/tinyshakespeare.txt")],
                     "batch_size": batch_size, **training, **(transfer or {}),
                     **({"emulate_link": True} if link else {})},
        "sites": {"caiso_north": {"region": "CAISO_NORTH", **site}, "nem_sa": {"region": "NEM_SA", **site}},
        "runs": [{"name": "always-on-federated", "policy": {"kind": "always_on"}, "sites": ["caiso_north", "nem_sa"],
                  "rules": {"provisioning_s": 0}}],
    }


def analyse(timings: pd.DataFrame) -> dict:
    starts = timings[timings.kind == "round_start"].sort_values("at_wall_s")
    rows = []
    for (_, first), (_, second) in zip(starts.iterrows(), starts.iloc[1:].iterrows()):
        inside = timings[(timings.at_wall_s > first.at_wall_s) & (timings.at_wall_s <= second.at_wall_s)]
        round_wall_s = second.at_wall_s - first.at_wall_s
        for site, site_rows in inside[inside.site != ""].groupby("site"):
            train = site_rows[site_rows.kind == "train"]
            if train.steps.sum() == 0:
                continue
            sync = site_rows[site_rows.kind.isin(["submit", "load", "merge", "landing_wait", "publish"])].wall_s.sum()
            outer = inside[inside.kind == "outer_step"].wall_s.sum()
            rows.append({"round": int(first["round"]), "site": site, "round_wall_s": round_wall_s,
                         "train_s": train.wall_s.sum(), "sync_s": sync + outer, "steps": int(train.steps.sum())})
    frame = pd.DataFrame(rows)
    frame["not_training_share"] = 1 - frame.train_s / frame.round_wall_s
    steady = frame[frame["round"] > frame["round"].min()]  # the first round includes worker start-up
    sync_s = steady.sync_s.mean()
    return {
        "rounds_measured": int(steady["round"].nunique()),
        "mean_round_wall_s": steady.round_wall_s.mean(),
        "mean_train_s": steady.train_s.mean(),
        "mean_steps_per_round": steady.steps.mean(),
        "mean_sync_s": sync_s,
        "not_training_share": steady.not_training_share.mean(),
        "max_not_training_share": steady.not_training_share.max(),
        "projected_share_of_600s_round": sync_s / 600.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "d20"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--transfer-dtype", default="bf16", choices=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--topk-fraction", type=float, help="send only this share of each tensor (top-k)")
    parser.add_argument("--broadcast-dtype", default="fp32", choices=["fp32", "bf16", "int8", "int4"],
                        help="the global weights' changes down to the sites")
    parser.add_argument("--link-mbit", type=float, help="emulate every site's link at this bandwidth (Mbit/s)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="one-way latency of the emulated link")
    parser.add_argument("--overlap", action="store_true", help="overlap each sync with the next round's training")
    parser.add_argument("--fragments", type=int, default=1,
                        help="with --overlap: sync the model in this many fragments staggered over the round")
    parser.add_argument("--speedup", type=float, help="the real-time clock at this speed (default: virtual clock)")
    parser.add_argument("--timings-csv", type=Path, help="also copy the run's timings.csv here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import curtail

    transfer = {"transfer_dtype": args.transfer_dtype, "transfer_topk_fraction": args.topk_fraction,
                "broadcast_dtype": args.broadcast_dtype, "sync_fragments": args.fragments}
    link = {"link_mbit_per_s": args.link_mbit, "link_latency_ms": args.latency_ms} if args.link_mbit else None
    with tempfile.TemporaryDirectory() as tmp:
        result = curtail.run(experiment(args.preset, args.rounds, args.steps_per_round, args.batch_size,
                                        transfer, link, args.overlap, args.speedup), output_dir=tmp)
        numbers = analyse(pd.read_csv(result.run_dir / "timings.csv"))
        if args.timings_csv is not None:
            args.timings_csv.write_bytes((result.run_dir / "timings.csv").read_bytes())
    traffic = result.summary["sync_traffic"].values()
    numbers.update({
        "preset": args.preset, "num_parameters": result.summary["num_parameters"],
        "transfer": f"{args.transfer_dtype}{f' top-{args.topk_fraction:g}' if args.topk_fraction else ''} up, "
                    f"{args.broadcast_dtype} down",
        "link": f"emulated {args.link_mbit:g} Mbit/s, {args.latency_ms:g} ms" if link else "none (local object store)",
        "mb_sent_per_submit": max(row["bytes_sent_per_submit"] for row in traffic) / 1e6,
        "mb_received_per_load": max(row["bytes_received_per_load"] for row in traffic) / 1e6,
        "overlap_sync": args.overlap, "sync_fragments": args.fragments, "clock": f"realtime x{args.speedup:g}" if args.speedup else "virtual",
        "blocked_s_per_round": max(row["blocked_s_per_round"] for row in traffic),
        "max_blocked_s": max(row["max_blocked_s"] for row in traffic),
    })
    if args.json:
        print(json.dumps(numbers, indent=2))
        return
    for key, value in numbers.items():
        print(f"{key:>32}: {value:.4f}" if isinstance(value, float) else f"{key:>32}: {value}")


if __name__ == "__main__":
    main()
