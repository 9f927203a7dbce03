"""Benchmark: bytes on the wire and held-out loss of compressed pseudo-gradients (DiLoCo).

    .venv/bin/python experiments/bench_compression.py                      # small preset, 3 seeds (~15 min, 2 cores)
    .venv/bin/python experiments/bench_compression.py --preset tiny --seeds 1 --rounds 4   # a quick look
    .venv/bin/python experiments/bench_compression.py --formats bf16 int4 --overlap-steps 5  # overlapped syncs
    python3 experiments/bench_compression.py --device cuda --corpus /tmp/pycorpus/train.txt \
        --heldout /tmp/pycorpus/heldout.txt --vocab-size 16384 --rounds 40   # a corpus the run does not repeat

Two sites train the same model DiLoCo-style in one process with curtail's own parts — the site
trainer (inner AdamW), its on-device packing with error feedback
(:meth:`~curtail.training.loop.SiteTrainer.compressed_pseudo_gradient`), the averaging actor's
decoding and the Nesterov outer step — on disjoint halves of real text (Tiny Shakespeare, or ``--corpus`` with
a held-out text of its own, ``--heldout``, e.g. from ``experiments/python_corpus.py``), for
``--rounds`` rounds of ``--inner-steps`` steps each. Every wire format sees the same data in the
same order from the same initial weights; only the transfer differs. Reported per format (mean
over ``--seeds``): pseudo-gradient bytes per site per round as a share of bf16, and the held-out
loss of the global model after the last round, relative to bf16 (the runtime's default).
With ``--overlap-steps N`` every sync is overlapped (``[execution] overlap_sync``): a site trains
the first N steps of its next round before the round's merged weights arrive, then merges them
(``θ ← θ_global + (θ − θ_sent)``, :meth:`~curtail.training.loop.SiteTrainer.merge_global`).
On ``--device cuda`` the sites train in bf16 autocast (``--compile`` compiles the loss). The
output says how many passes over its half of the corpus each site made (above 1: the held-out
loss also measures how the formats cope with repeated data). The table is in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from curtail.runtime.averager import advance_view
from curtail.training.averaging import make_outer_optimizer
from curtail.training.compression import WireFormat, compress, decompress
from curtail.training.data import load_corpus
from curtail.training.loop import SiteTrainer
from curtail.training.schedule import LRSchedule
from curtail.training.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "text" / "tinyshakespeare.txt"
FORMATS = {
    "bf16": WireFormat("bf16"),
    "fp32": WireFormat("fp32"),
    "int8": WireFormat("int8"),
    "int4": WireFormat("int4"),
    "int4, no error feedback": WireFormat("int4", error_feedback=False),
    "int4 + top-3 %": WireFormat("int4", topk_fraction=0.03),
    "int4 + top-5 %": WireFormat("int4", topk_fraction=0.05),
    "int8 + top-1 %": WireFormat("int8", topk_fraction=0.01),
    # SparseLoCo's recipe (chunk-wise top-k, a damped error-feedback accumulator): run with --outer average
    "int4 + top-3 % of 4096-chunks, β 0.95": WireFormat("int4", topk_fraction=0.03, topk_chunk=4096,
                                                        error_feedback_decay=0.95),
    "int4 + top-5 % of 4096-chunks, β 0.95": WireFormat("int4", topk_fraction=0.05, topk_chunk=4096,
                                                        error_feedback_decay=0.95),
    "int4 + top-8 % of 4096-chunks, β 0.95": WireFormat("int4", topk_fraction=0.08, topk_chunk=4096,
                                                        error_feedback_decay=0.95),
}
SITES = ("a", "b")


def run(preset: str, wire: WireFormat, seed: int, rounds: int, inner_steps: int, batch_size: int, seq_len: int,
        corpora, vocab_size: int, outer_optimizer: str = "nesterov", broadcast: WireFormat | None = None,
        overlap_steps: int = 0, device: str = "cpu", compile_model: bool = False,
        eval_batches: int = 16) -> dict[str, float]:
    """One two-site DiLoCo run; held-out loss and mean bytes per site per round. With
    ``broadcast`` the sites train from the averager's compressed view of the weights
    (:mod:`curtail.runtime.averager`), as a real run with ``broadcast_dtype`` does."""
    train, heldout = corpora
    torch.manual_seed(seed)
    step_tokens = batch_size * seq_len
    total_tokens = len(SITES) * rounds * inner_steps * step_tokens
    schedule = LRSchedule(peak_lr=3e-3, total_tokens=total_tokens, warmup_tokens=total_tokens // 20)
    options = {"device": device, "compile_model": compile_model,
               "autocast_dtype": torch.bfloat16 if device.startswith("cuda") else None}
    sites = {site: SiteTrainer(preset, vocab_size=vocab_size, seed=seed, **options) for site in SITES}
    global_params = sites["a"].export_params()
    view = {name: value.copy() for name, value in global_params.items()}
    outer = make_outer_optimizer(outer_optimizer)  # type: ignore[arg-type]
    half = train.num_trainable_tokens // len(SITES)
    sent, trained = [], 0
    for round_index in range(rounds):
        grads, tokens = {}, {}
        for index, (site, trainer) in enumerate(sites.items()):
            merge_at = overlap_steps if overlap_steps and round_index > 0 else 0  # the last round's lands then
            if not merge_at:
                trainer.load_global(view if broadcast else global_params)
            start = index * half + (round_index * inner_steps * step_tokens + seed * 7919 * seq_len) % (
                half - inner_steps * step_tokens)
            batches = train.iter_batches(start, start + inner_steps * step_tokens, batch_size, seq_len)
            for step, (_, input_ids, labels) in enumerate(batches):
                if merge_at and step == merge_at:
                    state = view if broadcast else global_params
                    trainer.merge_global(trainer.stage_global(state), state)
                progress = trained + len(SITES) * (step + 1) * step_tokens
                trainer.train_step(input_ids, labels, lr=schedule.lr_at(progress))
            packed = trainer.compressed_pseudo_gradient(view if broadcast else global_params, wire)
            if overlap_steps:
                trainer.hold_sent()
            sent.append(packed.num_bytes)
            grads[site], tokens[site] = decompress(packed), inner_steps * step_tokens
        trained += len(SITES) * inner_steps * step_tokens
        outer.step(global_params, grads, tokens)
        if broadcast is not None:  # the averager's view advances by the packed change
            advance_view(view, compress({name: global_params[name] - view[name] for name in view}, broadcast))
    del sites
    evaluator = SiteTrainer(preset, vocab_size=vocab_size, seed=seed, **options)
    evaluator.load_global(global_params)
    loss = evaluator.evaluate(heldout, num_batches=eval_batches, batch_size=batch_size, seq_len=seq_len)
    return {"heldout_loss": loss, "bytes_per_site_round": statistics.fmean(sent),
            "passes_per_site": rounds * inner_steps * step_tokens / half}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "d20"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="compile the loss (GPU runs)")
    parser.add_argument("--corpus", type=Path, nargs="*", default=[CORPUS], help="training text (default: Tiny Shakespeare)")
    parser.add_argument("--heldout", type=Path, nargs="*", help="held-out text (default: the corpus's last 5 %%)")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary (default: 512 tiny, 2048 small, 16384 d20)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 64 tiny, 128 small, 2048 d20)")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches of --batch-size sequences")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), help="of " + ", ".join(FORMATS).replace("%", "%%"))
    parser.add_argument("--outer", default="nesterov", choices=["nesterov", "average"], help="outer optimizer")
    parser.add_argument("--broadcast", choices=["bf16", "int8", "int4"], help="compressed view down (default: exact)")
    parser.add_argument("--overlap-steps", type=int, default=0,
                        help="overlapped syncs: the merge lands this many steps into the next round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    seq_len = args.seq_len or {"tiny": 64, "small": 128, "d20": 2048}[args.preset]
    vocab_size = args.vocab_size or {"tiny": 512, "small": 2048, "d20": 16384}[args.preset]
    cache = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    tokenizer = train_tokenizer(args.corpus, vocab_size=vocab_size, cache_dir=cache)
    corpora = load_corpus(args.corpus, tokenizer, cache_dir=cache, heldout_paths=args.heldout)
    print(f"corpus: {corpora[0].num_tokens:,} training tokens, {corpora[1].num_tokens:,} held out, "
          f"vocabulary {len(tokenizer):,}", flush=True)
    results: dict[str, list[dict[str, float]]] = {}
    for name in args.formats:
        for seed in range(args.seeds):
            started = time.perf_counter()
            outcome = run(args.preset, FORMATS[name], seed, args.rounds, args.inner_steps, args.batch_size, seq_len,
                          corpora, len(tokenizer), args.outer,
                          WireFormat(args.broadcast) if args.broadcast else None, args.overlap_steps,
                          args.device, args.compile, args.eval_batches)
            results.setdefault(name, []).append(outcome)
            print(f"{name} seed {seed}: loss {outcome['heldout_loss']:.4f}, "
                  f"{outcome['bytes_per_site_round']:,.0f} B/site/round ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    base = results.get("bf16")
    passes = next(iter(results.values()))[0]["passes_per_site"]
    print(f"\n{args.preset}, 2 sites, {args.rounds} rounds × {args.inner_steps} steps, {args.seeds} seeds, "
          f"{passes:.2f} passes over each site's half of the corpus, "
          f"outer {args.outer}, broadcast {args.broadcast or 'fp32 (exact)'}, "
          f"{f'overlapped by {args.overlap_steps} steps' if args.overlap_steps else 'blocking syncs'}\n")
    print("| wire format | bytes / site / round | of bf16 | held-out loss (mean ± sd) | vs bf16 |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        losses = [r["heldout_loss"] for r in runs]
        size = statistics.fmean(r["bytes_per_site_round"] for r in runs)
        share = f"{size / statistics.fmean(r['bytes_per_site_round'] for r in base):.3f}" if base else "–"
        delta = "–"
        if base:
            diffs = [r["heldout_loss"] / b["heldout_loss"] - 1 for r, b in zip(runs, base, strict=True)]
            delta = f"{statistics.fmean(diffs):+.2%} (worst {max(diffs, key=abs):+.2%})"
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        print(f"| {name} | {size:,.0f} | {share} | {statistics.fmean(losses):.4f}{spread} | {delta} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
