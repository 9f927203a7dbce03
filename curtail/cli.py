"""Command line: a thin layer over the Python API.

    curtail init [DIR] [--force]
    curtail run [CONFIG] [--run NAME] [--json] [--output-dir DIR] [--address ADDR]
    curtail run --resume RUN_DIR [--checkpoint N] [--json] [--address ADDR]
    curtail simulate [CONFIG] [--json] [--run NAME ...] [--output-dir DIR]
    curtail report RUN_DIR [RUN_DIR ...] [--out DIR] [--formats png pdf]
    curtail sweep CONFIG [--num-samples N] [--trainable simulator|runtime] [--search random|optuna]
                  [--output-dir DIR] [--resume] [--json]
    curtail serve-trace TRACE [--speedup N] [--port P] [--forecast F] [--naive-timezone Z] [...]
    curtail shadow CONFIG [--run NAME] [--interval-s S] [--reports N]
    curtail replay RUN_DIR [--json]
    curtail evaluate-policies [--datasets NAME ...] [--seeds N] [--periods N] [--json]
    curtail prepare-data FILE|DIR ... --output DIR|URI [--vocab-size N] [--num-proc N] [--json] [...]

Errors a user can cause (a config, a trace, a path, a resume that is refused, a cluster
without the resources asked for) print one ``curtail: error: ...`` line and exit 2; an
interrupted run (Ctrl-C) prints the command that continues it and exits 130. With ``--json``,
stdout carries exactly one JSON document: everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from curtail.config import ConfigError
from curtail.errors import CurtailError
from curtail.examples import example_config, write_examples
from curtail.planning.traces import TraceError
from curtail.tracking import TrackingError

USER_ERRORS = (CurtailError, ConfigError, TraceError, TrackingError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors a user causes and fixes: one line, exit 2. Anything else is a bug: a traceback."""
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C

DEFAULT_SIMULATION = "experiments/paper.toml"
DEFAULT_RUN = "experiments/demo.toml"


def _count(value: float) -> str:
    """Token counts for people: 12.27B, 300.0k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, header_style="bold", caption="ref: published figures where the config gives them")

    def ref(value: float | None, fmt: str) -> str:
        return "" if value is None or math.isnan(value) else fmt.format(value)

    columns = [
        ("run", "run", str),
        ("done", "completed", lambda v: "yes" if v else "NO"),
        ("tokens", "tokens", _count),
        ("hours", "hours", lambda v: f"{v:.2f}"),
        ("energy kWh", "energy_kwh", lambda v: f"{v:.1f}"),
        ("ref h", "reference_hours", lambda v: ref(v, "{:.1f}")),
        ("emissions kg", "emissions_kg", lambda v: f"{v:.2f}"),
        ("ref kg", "reference_emissions_kg", lambda v: ref(v, "{:.2f}")),
        ("in windows", "share_energy_in_windows", lambda v: f"{100 * v:.1f}%"),
        ("ref", "reference_share_energy_in_windows", lambda v: ref(v, "{:.0%}")),
        ("window use", "window_utilisation", lambda v: f"{100 * v:.1f}%"),
        ("single h", "single_h", lambda v: f"{v:.1f}"),
        ("fed. h", "federated_h", lambda v: f"{v:.1f}"),
        ("syncs", "num_syncs", str),
    ]
    for header, _, _ in columns:
        table.add_column(header, justify="left" if header in ("run", "sites") else "right")
    for row in rows:
        table.add_row(*(fmt(row[key]) for _, key, fmt in columns))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def _print_bounds(summaries: list[dict]) -> None:
    """Each run beside the least any schedule could emit on its budget (perfect foresight, no
    overheads): anywhere in its span, and only inside curtailment windows."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="emission bounds of each run's budget (perfect foresight, no overheads)",
        header_style="bold",
        caption="windows-only: training only while a site is curtailed; x: emissions / that bound",
    )
    for header in ("run", "emissions kg", "kg / 1B tokens", "bound kg", "windows-only bound kg", "x windows-only"):
        table.add_column(header, justify="left" if header == "run" else "right")

    def kg(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for s in summaries:
        if "emissions_bound_windows_only_kg" not in s:
            continue
        windows = s["emissions_bound_windows_only_kg"]
        per_1b = s.get("emissions_kg_per_1b_tokens")
        ratio = s.get("emissions_over_windows_only_bound")
        table.add_row(
            s["run"],
            f"{s['emissions_kg']:.3f}",
            "-" if per_1b is None else f"{per_1b:.4f}",
            kg(s["emissions_bound_kg"]) if s["emissions_bound_kg"] is not None else "budget does not fit",
            kg(windows) if windows is not None
            else f"none: windows hold {_count(s['windows_only_capacity_tokens'])} of {_count(s['token_budget'])}",
            "-" if ratio is None else f"{ratio:.2f}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def cmd_simulate(args: argparse.Namespace) -> int:
    from curtail.api import simulate

    config = Path(args.config) if args.config else example_config(DEFAULT_SIMULATION)
    result = simulate(config, runs=args.run or None, output_dir=args.output_dir)
    if args.json:
        print(json.dumps(result.summaries, indent=2, default=str), file=args.stdout)
        return 0
    _print_table(result.table().to_dict("records"), f"{result.experiment.name}: simulated runs")
    _print_bounds(result.summaries)
    root = result.run_dirs[0].parent if result.run_dirs else None
    if root is not None:
        print(f"run directories: {root}/<run>   (plots: curtail report {root}/*)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from curtail.api import run

    if args.resume:
        config = Path(args.config) if args.config else None  # given: it must be the run's own
    else:
        config = Path(args.config) if args.config else example_config(DEFAULT_RUN)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.fields[clock]}"),
        BarColumn(),
        TextColumn("{task.fields[tokens]} tokens"),
        TextColumn("{task.fields[mode]:<9} {task.fields[sites]}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.json or not console.is_terminal,
    ) as progress:
        task = progress.add_task("run", total=1.0, clock="starting", tokens="0", mode="", sites="", loss="-")

        last_clock = [""]

        def show(state: dict) -> None:
            if state.get("phase") != "training":
                progress.update(task, clock=state.get("phase", ""))
                return
            progress.update(
                task,
                completed=state["tokens"] / state["token_budget"],
                clock=state["clock"],
                tokens=_count(state["tokens"]),
                mode=state["mode"],
                sites="+".join(state["active_sites"]) or "-",
                loss=f"{state['loss']:.3f}",
            )
            if not console.is_terminal and not args.json and state["clock"] != last_clock[0]:
                last_clock[0] = state["clock"]
                print(f"{state['clock']}  {state['mode']:<9} {_count(state['tokens']):>8} tokens  "
                      f"loss {state['loss']:.3f}  sites {'+'.join(state['active_sites']) or '-'}", flush=True)

        result = run(config, run=args.run, output_dir=args.output_dir, address=args.address,
                     resume=args.resume, checkpoint=args.checkpoint, on_progress=show)
    if args.json:
        print(json.dumps(result.summary, indent=2, default=str), file=args.stdout)
        return 0
    s = result.summary
    if s.get("resume_checkpoint") or s.get("skipped_checkpoints"):
        skipped = "; ".join(f"skipped {c['checkpoint']}: {c['reason']}" for c in s["skipped_checkpoints"])
        print(f"resumed from checkpoint {s['resume_checkpoint'] or '(none: from the start)'}"
              + (f" ({skipped})" if skipped else ""))
    print(
        f"{s['run']}: {_count(s['tokens'])} tokens in {s['hours']:.2f} h on the run's clock "
        f"({s['wall_s']:.0f} s wall) | {s['emissions_kg']:.2f} kg CO2, "
        f"{100 * s['share_energy_in_windows']:.1f}% of energy in windows | modes (h): "
        + ", ".join(f"{k} {v:.1f}" for k, v in s["mode_hours"].items())
        + f" | {s['num_syncs']} syncs | final held-out loss {s['final_eval_loss']:.3f}"
    )
    print(f"run directory: {result.run_dir}   model: {result.model_dir}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    written = write_examples(args.directory, overwrite=args.force)
    folder = Path(args.directory)
    print(f"wrote {len(written)} files to {folder}/ (experiments/, data/traces/, data/text/); next:\n"
          f"  cd {folder} && curtail simulate && curtail run", file=args.stdout)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from curtail.report import report

    paths = report(args.run_dirs, args.out, formats=args.formats)
    for path in paths:
        print(path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from curtail.policy_sweep import sweep

    result = sweep(
        Path(args.config),
        num_samples=args.num_samples,
        trainable=args.trainable,
        output_dir=args.output_dir,
        search=args.search,
        resume=args.resume,
    )
    if args.json:
        print(json.dumps({"best": result.best, "wall_s": result.wall_s, "num_trials": result.num_trials,
                          "generalisation": result.generalisation.to_dict("records"),
                          "files": {k: str(v) for k, v in result.files.items()}}, indent=2, default=str),
              file=args.stdout)
        return 0
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(
        f"{result.num_trials} trials ({result.sweep.trainable}) on {result.sweep.tune_run} in "
        f"{result.wall_s:.1f} s; chosen: {result.best['policy']} {result.best['overrides'] or ''}"
    )
    if len(result.generalisation):
        table = Table(title="tuned on one period, evaluated on another (the oracle is the bound, not a policy)")
        for header in ("period", "run", "role", "policy", "done", "hours", "emissions kg", "in windows", "window use"):
            table.add_column(header, justify="left" if header in ("period", "run", "role", "policy") else "right")
        for row in result.generalisation.to_dict("records"):
            table.add_row(
                row["period"], row["run"], row["role"], row["policy"], "yes" if row["completed"] else "NO",
                f"{row['hours']:.1f}", f"{row['emissions_kg']:.2f}", f"{100 * row['share_energy_in_windows']:.1f}%",
                f"{100 * row['window_utilisation']:.1f}%",
            )
        console.print(table)
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


def cmd_serve_trace(args: argparse.Namespace) -> int:
    from curtail.sources.trace_server import serve

    serve(args)
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    from curtail.config import load_experiment
    from curtail.shadow import shadow

    experiment = load_experiment(args.config)
    spec = experiment.run(args.run) if args.run else experiment.runs[0]
    shadow_dir = experiment.output_dir / experiment.name / f"shadow-{spec.name}"
    print(f"shadow of {experiment.name}/{spec.name}: no training; readings go to {shadow_dir}", flush=True)
    shadow(experiment, spec, shadow_dir, interval_s=args.interval_s, stop_after=args.reports)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from curtail.api import replay

    record = replay(Path(args.run_dir))
    if args.json:
        print(json.dumps(record.summary, indent=2, default=str), file=args.stdout)
        return 0
    summary = record.summary
    match = "the same as the run's" if summary["decisions_match_run"] else (
        f"DIFFERENT from the run's (first: {summary['first_difference']})")
    print(f"replay of {args.run_dir}: {summary['decisions']} decisions, {match}; "
          f"{summary['hours']:.2f} h, {summary['energy_kwh']:.1f} kWh, {summary['emissions_kg']:.3f} kg CO2, "
          f"{100 * summary['share_energy_in_windows']:.1f}% of energy in windows")
    print(f"replay: {Path(args.run_dir) / 'replay'}")
    return 0 if summary["decisions_match_run"] else 1


def cmd_evaluate_policies(args: argparse.Namespace) -> int:
    from curtail.policy_eval import DATASETS, evaluate, table

    results = evaluate(args.datasets or DATASETS, seeds=args.seeds, budget_fraction=args.budget_fraction,
                       periods=args.periods)
    if args.json:
        print(json.dumps(results, indent=2, default=str), file=args.stdout)
        return 0
    for name, result in results.items():
        print(f"{name}: budget price tuned on {len(result['tune_periods'])} other period(s): "
              f"{result['tuned_budget_price_g_per_kwh']}")
    print(table(results))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from curtail.run_store import redact
    from curtail.training.prepare import prepare_shards

    started = time.perf_counter()
    manifest = prepare_shards(
        args.files, args.output, vocab_size=args.vocab_size, tokenizer=args.tokenizer, heldout=args.heldout,
        heldout_fraction=args.heldout_fraction, shard_tokens=args.shard_tokens, text_field=args.text_field,
        num_proc=args.num_proc, batch_rows=args.batch_rows, tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 2**20),
        cache_dir=args.cache_dir, overwrite=args.overwrite,
    )
    record = {"output": redact(args.output), "identity": manifest.identity, "num_tokens": manifest.num_tokens,
              "train_tokens": manifest.heldout_start, "heldout_tokens": manifest.num_tokens - manifest.heldout_start,
              "shards": len(manifest.shards), "sources": len(manifest.sources), "vocab_size": manifest.vocab_size,
              "dtype": manifest.dtype, "wall_s": round(time.perf_counter() - started, 2)}
    if args.json:
        print(json.dumps(record, indent=2), file=args.stdout)
        return 0
    print(f"{record['output']}: {_count(manifest.num_tokens)} tokens ({_count(record['train_tokens'])} train, "
          f"{_count(record['heldout_tokens'])} held out) in {record['shards']} shards from {record['sources']} "
          f"file(s), vocabulary {manifest.vocab_size}, {record['wall_s']:.1f} s; train on it with "
          f"[training] corpus_shards = \"{args.output}\"")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curtail", description=__doc__.splitlines()[0])
    from curtail import __version__

    parser.add_argument("--version", action="version", version=f"curtail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train for real on Ray, following the curtailment calendar")
    run.add_argument("config", nargs="?", help=f"experiment TOML (default: {DEFAULT_RUN})")
    run.add_argument("--run", help="which of the experiment's runs (default: the first)")
    run.add_argument("--output-dir", help="root of the run directories (default: the config's output_dir)")
    run.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its newest intact checkpoint (CONFIG, if given, "
                          "must be the run's own)")
    run.add_argument("--checkpoint", metavar="N", type=int,
                     help="with --resume: continue from checkpoint N (a folder of RUN_DIR/checkpoints/)")
    run.add_argument("--json", action="store_true", help="print the run's summary.json object")
    run.set_defaults(handler=cmd_run)

    simulate = commands.add_parser("simulate", help="replay an experiment's runs in the fast simulator")
    simulate.add_argument("config", nargs="?", help=f"experiment TOML (default: {DEFAULT_SIMULATION})")
    simulate.add_argument("--run", action="append", help="only this run (repeatable)")
    simulate.add_argument("--output-dir", help="root of the run directories (default: the config's output_dir)")
    simulate.add_argument("--json", action="store_true", help="print the runs' summary.json objects as a JSON list")
    simulate.set_defaults(handler=cmd_simulate)

    shadow = commands.add_parser("shadow", help="follow a [live] signal with the policy, without training")
    shadow.add_argument("config", help="experiment TOML with a [live] source, e.g. experiments/live_demo.toml")
    shadow.add_argument("--run", help="which of the experiment's runs (default: the first)")
    shadow.add_argument("--interval-s", type=float, default=300.0,
                        help="report at least this often, in seconds of the signal's clock (default: 300)")
    shadow.add_argument("--reports", type=int, help="stop after this many reports (default: the run's duration)")
    shadow.set_defaults(handler=cmd_shadow)

    replay = commands.add_parser("replay", help="simulate a finished live run on the signal it recorded")
    replay.add_argument("run_dir", help="a live run's directory (it holds live_readings.jsonl)")
    replay.add_argument("--json", action="store_true", help="print the replay's summary.json object")
    replay.set_defaults(handler=cmd_replay)

    init = commands.add_parser("init", help="write the example configs, traces and corpus into a folder")
    init.add_argument("directory", nargs="?", default=".", help="where (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite example files already there")
    init.set_defaults(handler=cmd_init)
    report = commands.add_parser("report", help="plot run directories (PNG and PDF)")
    report.add_argument("run_dirs", nargs="+", help="run directories written by simulate or run")
    report.add_argument("--out", default="reports", help="folder for the figures (default: reports)")
    report.add_argument("--formats", nargs="+", default=["png", "pdf"], choices=["png", "pdf"],
                        help="file types (default: png pdf)")
    report.set_defaults(handler=cmd_report)
    sweep = commands.add_parser("sweep", help="Ray Tune search over policies (the experiment's [sweep])")
    sweep.add_argument("config", help="experiment TOML with a [sweep] section, e.g. experiments/sweep_policies.toml")
    sweep.add_argument("--num-samples", type=int, help="samples per policy kind (default: the config's)")
    sweep.add_argument("--trainable", choices=["simulator", "runtime"], help="default: the config's")
    sweep.add_argument("--output-dir", help="results folder (default: <output_dir>/<experiment>/sweep)")
    sweep.add_argument("--search", choices=["random", "optuna"], help="search algorithm (default: the config's)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep Tune left in the output folder (after a crash or Ctrl-C)")
    sweep.add_argument("--json", action="store_true", help="print the chosen trial and generalisation as JSON")
    sweep.set_defaults(handler=cmd_sweep)
    evaluation = commands.add_parser(
        "evaluate-policies", help="tune on some periods, evaluate every policy on others (curtail.policy_eval)")
    evaluation.add_argument("--datasets", nargs="+", help="paper, caiso, sgip, average (default: all)")
    evaluation.add_argument("--seeds", type=int, default=5, help="forecast seeds where forecasts are synthetic")
    evaluation.add_argument("--periods", type=int, help="evaluate only the first N periods of each dataset")
    evaluation.add_argument("--budget-fraction", type=float, default=0.5,
                            help="each period's budget: this share of what its windows hold")
    evaluation.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluation.set_defaults(handler=cmd_evaluate_policies)

    prepare = commands.add_parser(
        "prepare-data", help="tokenize text / JSONL / Parquet files into token shards ([training] corpus_shards)")
    prepare.add_argument("files", nargs="+", help="corpus files or folders of them (.txt, .md, .jsonl, .parquet)")
    prepare.add_argument("--output", required=True, help="the shard folder to write (a path or a pyarrow.fs URI)")
    prepare.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary to train (default: 2048)")
    prepare.add_argument("--tokenizer", help="encode with this saved tokenizer folder instead of training one")
    prepare.add_argument("--heldout", nargs="+", help="separate held-out files (default: the last --heldout-fraction)")
    prepare.add_argument("--heldout-fraction", type=float, default=0.05, help="default: 0.05")
    prepare.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default: 16 Mi)")
    prepare.add_argument("--text-field", default="text", help="the text column of JSONL / Parquet (default: text)")
    prepare.add_argument("--num-proc", type=int, default=1, help="encoding processes, one file each at a time")
    prepare.add_argument("--batch-rows", type=int, default=1024, help="rows encoded at once per process")
    prepare.add_argument("--tokenizer-sample-mb", type=float, default=64.0,
                         help="text the tokenizer is trained on (default: 64 MiB)")
    prepare.add_argument("--cache-dir", default=".cache", help="where trained tokenizers are cached")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    prepare.add_argument("--json", action="store_true", help="print what was written as JSON")
    prepare.set_defaults(handler=cmd_prepare_data)

    from curtail.sources.trace_server import add_arguments as add_serve_trace_arguments

    serve_trace = commands.add_parser(
        "serve-trace", help="serve a recorded trace as the WattTime v3 API on a faster clock (tests, demos)"
    )
    add_serve_trace_arguments(serve_trace)
    serve_trace.set_defaults(handler=cmd_serve_trace)
    return parser


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[TextIO]:
    """The stream for the command's JSON document. With ``enabled``, everything else written
    to file descriptor 1 while the command runs — Ray's and other libraries' prints, from any
    thread or from C — goes to stderr, so stdout parses as JSON."""
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = open(os.dup(saved), "w", encoding="utf-8")  # noqa: SIM115 -- closed below, after fd 1 is back
    try:
        with contextlib.redirect_stdout(sys.stderr):  # where sys.stdout is not fd 1 (a notebook, pytest)
            yield out
    finally:
        out.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "checkpoint", None) is not None and not args.resume:
        parser.error("--checkpoint N picks the checkpoint of a resume: add --resume RUN_DIR")
    from curtail.api import RunInterrupted

    try:
        with json_stdout(getattr(args, "json", False)) as args.stdout:
            return args.handler(args)
    except RunInterrupted as interrupted:
        print(f"curtail: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("curtail: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        print(f"curtail: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
