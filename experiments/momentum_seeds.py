"""Experiment: the outer-momentum rule against a hand-set momentum over several seeds (the demo).

    .venv/bin/python experiments/momentum_seeds.py --seeds 0 1 2 --momenta auto 0.5   # ~4 min per run, 2 CPU cores

Runs the main job (``experiments/demo.toml``, or ``--config``) once per seed and outer momentum
(``auto``: the rule μ = 0.9·H/(H + 10) of ``outer_momentum = "auto"``; a number: that momentum;
``average``: plain token-weighted averaging, ``outer_optimizer = "average"``),
everything else equal, and prints each run's final held-out loss, each momentum's mean and
spread over the seeds, and the mean difference from the first momentum with its seed-to-seed
spread. Rows accumulate in ``OUTPUT_DIR/momentum_seeds.json`` (a run with a row is not made again).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from compare_centralized import outer_setting, with_outer_setting

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/demo.toml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--momenta", type=outer_setting, nargs="+", default=["auto", 0.5])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/momentum"))
    args = parser.parse_args()

    import curtail
    from curtail.config import load_experiment

    base = load_experiment(args.config)
    table = args.output_dir / "momentum_seeds.json"
    rows = json.loads(table.read_text()) if table.is_file() else []
    done = {(row["outer_momentum_setting"], row["seed"]) for row in rows}
    for setting in args.momenta:
        for seed in args.seeds:
            if (setting, seed) in done:
                continue
            run = f"{base.runs[0].name}-mu{setting}-seed{seed}"
            experiment = base.replace(seed=seed, training=with_outer_setting(base.training, setting),
                                      runs=[base.runs[0].replace(name=run)])
            summary = curtail.run(experiment, output_dir=args.output_dir).summary
            rows.append({"outer_momentum_setting": setting, "seed": seed, "outer_momentum": summary["outer_momentum"],
                         "final_eval_loss": summary["final_eval_loss"], "tokens": summary["tokens"],
                         "wall_s": summary["wall_s"]})
            args.output_dir.mkdir(parents=True, exist_ok=True)
            table.write_text(json.dumps(rows, indent=2))
    by = {setting: {row["seed"]: row for row in rows if row["outer_momentum_setting"] == setting}
          for setting in args.momenta}
    for setting, runs in by.items():
        losses = [runs[s]["final_eval_loss"] for s in args.seeds if s in runs]
        mu = next(iter(runs.values()))["outer_momentum"] if runs else None
        spread = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        print(f"outer setting {setting}" + ("" if mu is None else f" (μ {mu:.3f})") + ": " + ", ".join(f"{loss:.4f}" for loss in losses)
              + f"; mean {statistics.fmean(losses):.4f}, sd {spread:.4f}")
    first, *others = args.momenta
    for other in others:
        seeds = [s for s in args.seeds if s in by[first] and s in by[other]]
        gaps = [by[first][s]["final_eval_loss"] - by[other][s]["final_eval_loss"] for s in seeds]
        if gaps:
            spread = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
            print(f"{first} − {other}: mean {statistics.fmean(gaps):+.4f} nats over seeds {seeds} (sd {spread:.4f})")


if __name__ == "__main__":
    main()
