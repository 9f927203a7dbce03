#!/usr/bin/env bash
# Quality at scale on a GPU machine (docs/BENCHMARKS.md, "Quality at scale"): builds the corpus
# (the installed packages' Python source, split by package) and its d12 token shards once under
# .cache/, then makes the comparison runs of experiments/gpu_quality.toml.
#
#   bash experiments/gpu_quality.sh                        # aware, centralized, compressed, averaged, at once
#   bash experiments/gpu_quality.sh --runs centralized     # one of them (rows accumulate)
#
# Stopped with SIGINT (timeout -s INT), the runs checkpoint; the same command continues them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -f .cache/pycorpus-d12/manifest.json ]; then
    "$PY" experiments/python_corpus.py --output .cache/pycorpus --max-train-mb 1000 --max-heldout-mb 8
    "$PY" -m curtail.cli prepare-data .cache/pycorpus/train.txt --heldout .cache/pycorpus/heldout.txt \
        --vocab-size 32768 --num-proc "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --output .cache/pycorpus-d12 --json
fi
# aware-average: the aware run with plain averaging (a run's default), beside the measured rule's
# Nesterov run of gpu_quality.toml (docs/BENCHMARKS.md, "Quality at scale")
[ "$#" -gt 0 ] || set -- --compressed --outer average --parallel
"$PY" experiments/compare_centralized.py --config experiments/gpu_quality.toml --device cuda \
    --output-dir .cache/quality "$@"
