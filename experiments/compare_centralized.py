"""Experiment: held-out loss of the curtailment-aware run vs a centralized run, same budget.

    .venv/bin/python experiments/compare_centralized.py            # the CPU demo, ~10 min on 2 CPU cores
    python3 experiments/compare_centralized.py --config experiments/gpu_quality.toml --compressed   # one H200

Runs, with the same model, data, seed, LR schedule and token budget:

* ``aware``: the config's first run (its policy over its sites, on its trace);
* ``centralized``: one site (the aware run's last), always on;
* ``compressed`` (``--compressed``): the aware run with int4 pseudo-gradients (error feedback).
* ``aware-mu<M>`` / ``aware-auto`` / ``aware-average`` (``--outer M auto average``): the aware run
  with another outer setting, a fixed Nesterov momentum, Nesterov with the momentum rule, or plain
  token-weighted averaging.

Each runs for real on a local Ray cluster. Then every saved global model is loaded with
``AutoModelForCausalLM.from_pretrained`` and its held-out loss recomputed on the evaluator's
batches, which must match the run's last evaluation. ``OUTPUT_DIR/comparison.json`` collects
the rows (``--runs`` runs a subset and adds to the rows already there, so the runs can be made
in separate calls; a run with a row is not made again, and a run stopped with Ctrl-C, e.g.
``timeout -s INT``, is continued from its checkpoint by the next call with the same arguments) and
``OUTPUT_DIR/heldout_loss.png`` plots every run's held-out loss of the global model after each
sync against tokens. The prior system reported its federated model within 0.3 perplexity of the
centralized one.

``--parallel`` makes the runs at once, each in its own process and local Ray cluster (its output
in ``OUTPUT_DIR/<run>.log``). On one GPU they share the device: the steps of one fill the time
another spends starting a worker group, compiling or syncing, and every run trains the same steps
as alone (a train command's steps follow the run's clock, not the device's speed), so the
losses do not change; the wall times do.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("aware", "centralized", "compressed")


def outer_setting(text: str) -> float | str:
    """An outer setting from the command line: ``auto`` (the rule), ``average`` or a momentum."""
    return text if text in ("auto", "average") else float(text)


def with_outer_setting(training: Any, setting: float | str) -> Any:
    """The training config with this outer setting (a momentum, ``auto`` or ``average``)."""
    if setting == "average":
        return training.replace(outer_optimizer="average")
    return training.replace(outer_optimizer="nesterov", outer_momentum=setting)


def outer_variant(setting: float | str) -> str:
    return f"aware-mu{setting}" if isinstance(setting, float) else f"aware-{setting}"


def variants(experiment: Any, central_site: str | None,
             outer: tuple[float | str, ...] = ()) -> dict[str, tuple[Any, str]]:
    """The experiment and run name of each comparison run."""
    from curtail.config import RunSpec

    aware = experiment.runs[0]
    site = central_site or aware.sites[-1]
    centralized = RunSpec(name=f"centralized-{site}", policy={"kind": "always_on"}, sites=[site],
                          rules=experiment.rules.replace(provisioning_s=0),
                          execution=experiment.execution.replace(group_start_s=0))
    compressed = experiment.replace(training=experiment.training.replace(transfer_dtype="int4"),
                                    runs=[aware.replace(name=f"{aware.name}-int4")])
    made = {"aware": (experiment, aware.name),
            "centralized": (experiment.replace(runs=[*experiment.runs, centralized]), centralized.name),
            "compressed": (compressed, f"{aware.name}-int4")}
    for setting in outer:
        name = outer_variant(setting)
        run = f"{aware.name}-{name.removeprefix('aware-')}"
        made[name] = (experiment.replace(training=with_outer_setting(experiment.training, setting),
                                         runs=[aware.replace(name=run)]), run)
    return made


def reloaded_heldout_loss(experiment: Any, model_dir: Path, device: str) -> float:
    """The saved model's held-out loss: loaded with transformers, scored as the run's evaluator
    scores (the same batches and loss, :meth:`SiteTrainer.evaluate`)."""
    from transformers import AutoModelForCausalLM

    from curtail.preflight import resolve_data_path
    from curtail.runtime.coordinator import prepare_data
    from curtail.training.data import TokenCorpus
    from curtail.training.loop import SiteTrainer
    from curtail.training.model import get_spec

    training = experiment.training
    tokenizer, _, heldout = prepare_data(training, resolve_data_path(training.cache_dir))
    saved = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SiteTrainer(get_spec(training.preset), len(tokenizer), experiment.seed, device=device)
    trainer.load_global({name: value.detach().numpy() for name, value in saved.named_parameters()})
    return trainer.evaluate(TokenCorpus(heldout, "heldout"), training.eval_batches, training.eval_batch_size,
                            training.seq_len)


def run_row(name: str, experiment: Any, run: str, output_dir: Path, device: str) -> dict[str, Any]:
    import curtail
    from curtail.runlog import read_run_dir

    run_dir = output_dir / experiment.name / run
    if (run_dir / "summary.json").is_file():  # stopped while its saved model was scored
        print(f"{run}: finished by an earlier call, scoring its saved model")
    elif (run_dir / "checkpoints" / "LATEST").is_file():
        print(f"{run}: continuing the interrupted run in {run_dir}")
        curtail.run(resume=run_dir)
    else:
        run_dir = curtail.run(experiment, run=run, output_dir=output_dir).run_dir
    s = json.loads((run_dir / "summary.json").read_text())
    reloaded = reloaded_heldout_loss(experiment, Path(s["model_dir"]), device)
    losses = read_run_dir(run_dir).losses
    evals = losses[losses["kind"] == "eval"].sort_values("tokens")
    return {"variant": name, "run": s["run"], "tokens": s["tokens"], "completed": s["completed"],
            "final_eval_loss": s["final_eval_loss"], "reloaded_eval_loss": reloaded,
            "perplexity": math.exp(s["final_eval_loss"]), "num_syncs": s["num_syncs"],
            "inner_steps_per_round": s["inner_steps_per_round"], "outer_momentum": s["outer_momentum"],
            "transfer_dtype": experiment.training.transfer_dtype, "num_parameters": s["num_parameters"],
            "emissions_kg": s["emissions_kg"], "hours": s["hours"], "wall_s": s["wall_s"],
            "run_dir": str(run_dir),
            "eval_curve": [[float(t), float(v)] for t, v in zip(evals["tokens"], evals["loss"], strict=True)]}


@contextmanager
def locked_rows(table: Path, *, write: bool = True) -> Iterator[dict[str, dict[str, Any]]]:
    """The table's rows by variant, read (and written back, if ``write``) while no other process
    writes them: runs made at once each add their own row."""
    table.parent.mkdir(parents=True, exist_ok=True)
    with table.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = {row["variant"]: row for row in json.loads(table.read_text())} if table.is_file() else {}
        yield rows
        if write:
            table.write_text(json.dumps(list(rows.values()), indent=2))


def read_rows(table: Path) -> dict[str, dict[str, Any]]:
    """The table's rows by variant as they are now (none while another process writes them)."""
    with locked_rows(table, write=False) as rows:
        return rows


def run_in_parallel(names: list[str], args: argparse.Namespace) -> None:
    """Each run in a process of its own, all at once; Ctrl-C reaches them all (one process group),
    and each stops at a checkpoint that the next call continues."""
    own = ["--config", args.config, "--output-dir", str(args.output_dir), "--device", args.device]
    if args.central_site:
        own += ["--central-site", args.central_site]
    if args.outer:
        own += ["--outer", *map(str, args.outer)]
    children = {}
    for name in names:
        log = (args.output_dir / f"{name}.log").open("a")
        children[name] = subprocess.Popen([sys.executable, __file__, *own, "--runs", name], stdout=log,
                                          stderr=subprocess.STDOUT)
        print(f"{name}: started (pid {children[name].pid}, output in {log.name})")
    failed = []
    for name, child in children.items():
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # the children got it too: let them reach their checkpoints
                continue
        print(f"{name}: exit status {code}")
        if code != 0:
            failed.append(name)
    if failed:
        raise SystemExit(f"{', '.join(failed)} did not finish (see their logs in {args.output_dir}); "
                         "the next call with the same arguments continues them")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Every run's held-out loss of the global model after each sync, against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for row in rows:
        if not row["eval_curve"]:
            continue
        tokens, losses = zip(*row["eval_curve"], strict=True)
        axes.plot([t / 1e6 for t in tokens], losses, marker=".", label=f"{row['run']} ({row['final_eval_loss']:.3f})")
    axes.set(xlabel="tokens trained (millions)", ylabel="held-out loss (nats/token)",
             title="Held-out loss of the global model after each sync")
    axes.set_ylim(top=min(axes.get_ylim()[1], 2 * max(row["final_eval_loss"] for row in rows)))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/demo.toml"))
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))
    parser.add_argument("--compressed", action="store_true", help="also the aware run with int4 pseudo-gradients")
    parser.add_argument("--outer", type=outer_setting, nargs="+", default=[],
                        help="also the aware run with these outer settings: a Nesterov momentum, auto (Nesterov "
                        "with the momentum rule) or average")
    parser.add_argument("--runs", nargs="+", help="run only these (aware, centralized, compressed, aware-mu<M>, "
                        "aware-auto, aware-average; default: aware, centralized, compressed with --compressed and those of --outer); "
                        "rows from earlier calls are kept, and their runs not made again")
    parser.add_argument("--central-site", help="the centralized run's site (default: the aware run's last)")
    parser.add_argument("--device", default="cpu", help="where the saved models are re-scored (cuda on a GPU)")
    parser.add_argument("--parallel", action="store_true", help="make the runs at once, each in its own process")
    parser.add_argument("--plot-only", action="store_true", help="no runs: draw OUTPUT_DIR/comparison.json's curves")
    args = parser.parse_args()

    from curtail.api import RunInterrupted
    from curtail.config import load_experiment

    experiment = load_experiment(args.config)
    made = variants(experiment, args.central_site, tuple(args.outer))
    chosen = args.runs or [r for r in made if r != "compressed" or args.compressed]
    if unknown := sorted(set(chosen) - set(made)):
        parser.error(f"--runs {' '.join(unknown)}: choose from {', '.join(made)} (aware-mu<M>, aware-auto and "
                     "aware-average need --outer)")
    table = args.output_dir / "comparison.json"
    done = set(read_rows(table))
    pending = {}
    for name, (variant, run) in made.items():
        if name not in chosen or args.plot_only:
            continue
        if name in done:
            print(f"{run}: measured by an earlier call (its row in {table}; delete that to run it again)")
        else:
            pending[name] = (variant, run)
    if args.parallel and len(pending) > 1:
        run_in_parallel(list(pending), args)
        pending = {}
    for name, (variant, run) in pending.items():
        try:
            row = run_row(name, variant, run, args.output_dir, args.device)
        except RunInterrupted as stopped:
            raise SystemExit(f"{run}: {stopped}; the next call with the same arguments continues it") from None
        with locked_rows(table) as rows:
            rows[name] = row
    rows = read_rows(table)
    ordered = [rows[name] for name in RUNS if name in rows] + [row for name, row in rows.items() if name not in RUNS]
    if not ordered:
        raise SystemExit(f"no runs measured yet in {table}")
    try:
        plot(ordered, args.output_dir / "heldout_loss.png")
    except ImportError as missing:  # a GPU image without matplotlib: draw it elsewhere with --plot-only
        print(f"no figure ({missing}); draw it with --plot-only where matplotlib is installed")
    by = {row["variant"]: row for row in ordered}
    for row in ordered:
        print(f"{row['run']}: held-out loss {row['final_eval_loss']:.4f} (reloaded {row['reloaded_eval_loss']:.4f}), "
              f"perplexity {row['perplexity']:.2f}, {row['tokens']:,.0f} tokens, {row['wall_s']:.0f} s")
    if "aware" in by and "centralized" in by:
        gap = by["aware"]["final_eval_loss"] / by["centralized"]["final_eval_loss"] - 1
        print(f"aware vs centralized: {100 * gap:+.2f}% held-out loss, perplexity "
              f"{by['aware']['perplexity'] - by['centralized']['perplexity']:+.2f}")
    if "aware" in by and "compressed" in by:
        gap = by["compressed"]["final_eval_loss"] / by["aware"]["final_eval_loss"] - 1
        print(f"int4 vs bf16 transfer: {100 * gap:+.2f}% held-out loss")
    for name in by:
        if name not in RUNS and "centralized" in by:
            gap = by[name]["final_eval_loss"] / by["centralized"]["final_eval_loss"] - 1
            print(f"{name} vs centralized: {100 * gap:+.2f}% held-out loss")


if __name__ == "__main__":
    main()
