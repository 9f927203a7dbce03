"""Benchmark: ``curtail prepare-data`` on a corpus larger than a memory cap — peak memory and speed.

    .venv/bin/python experiments/bench_prepare_data.py                          # 2 GiB of text, cap 2 GiB (~15 min, 2 cores)
    .venv/bin/python experiments/bench_prepare_data.py --size-gb 0.25 --num-proc 1   # a quick look

Builds ``--size-gb`` of real text in a temporary folder — the shipped corpora (Tiny Shakespeare,
WikiText-2) and other local text (the Python standard library's sources and docs), as
``--files`` text files plus one JSONL and one Parquet file of the same text — then runs
``curtail prepare-data`` on it in a child process, sampling the resident memory of that process
and all its children (the encoding processes) every 0.1 s. Reported: the peak of that sum
against ``--memory-cap-gb``, wall time, MB/s of text, tokens, shards; exits non-zero if the
peak is over the cap. The shards are then opened and read end to end through the run's reader
(:class:`~curtail.training.shards.ShardedTokens`, 2 shards mapped at most) and checked against
their sha256, with that process's peak memory. The table is in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "data" / "text" / name for name in
           ("tinyshakespeare.txt", "wikitext-2_valid.txt", "wikitext-2_test.txt")]
GIB = 1 << 30


def text_pool(limit_bytes: int = 64 << 20) -> str:
    """The shipped corpora and the standard library's Python sources, up to ``limit_bytes``."""
    parts = [path.read_text(encoding="utf-8") for path in SHIPPED]
    size = sum(len(p) for p in parts)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= limit_bytes or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
    return "\n".join(parts)


def write_corpus(folder: Path, size_bytes: int, num_files: int) -> int:
    """``num_files`` text files and one JSONL and one Parquet file of real text, ``size_bytes`` in all."""
    pool = text_pool()
    per_file = size_bytes // (num_files + 2)
    written = 0
    for index in range(num_files):
        offset = (index * 7_919_111) % len(pool)  # each file starts elsewhere in the pool
        with open(folder / f"part-{index:03d}.txt", "w", encoding="utf-8") as out:
            left = per_file
            while left > 0:
                piece = pool[offset: offset + min(left, 8 << 20)]
                out.write(piece)
                left -= len(piece)
                offset = (offset + len(piece)) % len(pool)
        written += (folder / f"part-{index:03d}.txt").stat().st_size
    documents = [doc for doc in pool.split("\n\n") if doc.strip()]
    rows, size = [], 0
    while size < per_file:
        for doc in documents:
            rows.append(doc)
            size += len(doc)
            if size >= per_file:
                break
    with open(folder / "documents.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps({"text": doc}) + "\n" for doc in rows)
    pq.write_table(pa.table({"text": rows}), folder / "documents.parquet", row_group_size=4096)
    return written + sum((folder / name).stat().st_size for name in ("documents.jsonl", "documents.parquet"))


def peak_tree_rss(command: list[str]) -> tuple[int, float, str]:
    """Run ``command``; the peak of its process tree's summed RSS (bytes), wall seconds, stdout."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return peak, time.perf_counter() - started, out


READ_BACK = """
import json, sys, time
from curtail.training.shards import ShardedTokens
tokens = ShardedTokens.open(sys.argv[1], max_mapped_shards=2)
started, step, total = time.perf_counter(), 1 << 22, 0
for start in range(0, len(tokens), step):
    total += int(tokens[start:start + step].size)
read_s = time.perf_counter() - started
tokens.verify()
# VmHWM: this program's peak (ru_maxrss would count the benchmark's own memory, copied at the fork)
peak_kib = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"tokens": total, "read_s": read_s, "peak_rss": peak_kib * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="GiB of text to prepare")
    parser.add_argument("--memory-cap-gb", type=float, default=2.0, help="peak memory allowed (GiB)")
    parser.add_argument("--files", type=int, default=14, help="text files (plus one JSONL, one Parquet)")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, help="where the corpus and shards go (default: a temp folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    corpus, shards = workdir / "corpus", workdir / "shards"
    corpus.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        size = write_corpus(corpus, int(args.size_gb * GIB), args.files)
        print(f"corpus: {size / GIB:.2f} GiB in {args.files + 2} files ({time.perf_counter() - started:.0f} s to write)",
              flush=True)
        command = [sys.executable, "-m", "curtail", "prepare-data", str(corpus), "--output", str(shards),
                   "--num-proc", str(args.num_proc), "--vocab-size", str(args.vocab_size), "--overwrite", "--json",
                   "--cache-dir", str(workdir / "cache")]
        peak, wall_s, out = peak_tree_rss(command)
        record = json.loads(out)
        read = json.loads(subprocess.run([sys.executable, "-c", READ_BACK, str(shards)], capture_output=True,
                                         text=True, check=True).stdout)
        cap = args.memory_cap_gb * GIB
        print("\n| text | processes | peak RSS (all processes) | cap | wall | text MB/s | tokens | shards | "
              "read back (peak RSS, Mtokens/s) |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {size / GIB:.2f} GiB | {args.num_proc} | {peak / GIB:.2f} GiB | {args.memory_cap_gb:.1f} GiB | "
              f"{wall_s:.0f} s | {size / 1e6 / wall_s:.1f} | {record['num_tokens'] / 1e6:.0f} M | {record['shards']} | "
              f"{read['peak_rss'] / 2**20:.0f} MiB, {read['tokens'] / 1e6 / read['read_s']:.0f} |")
        assert read["tokens"] == record["num_tokens"]
        if peak > cap:
            raise SystemExit(f"peak RSS {peak / GIB:.2f} GiB is over the cap of {args.memory_cap_gb} GiB")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
