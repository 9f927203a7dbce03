#!/usr/bin/env bash
# Float8 against bf16 on d20 on a GPU machine (docs/BENCHMARKS.md, "Float8 against bf16"): a ~12M-token
# slice of the installed packages' Python source tokenized once under .cache/, then
# experiments/fp8_quality.py (300 steps of 16 × 2,048 tokens each, the same batches for each
# precision, two steps of each profiled, with the float8 casts' bandwidth ceiling). Extra
# arguments go to fp8_quality.py, e.g. --precisions bf16 fp8 fp8-rowwise --parallelism fsdp --seeds 0 1 2
# Needs torchao where the GPU image lacks it: carry its wheel (torchao 0.18 for torch 2.11 was
# measured) and pip install it into the bundle's site folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -f .cache/pycorpus-fp8-d20/manifest.json ]; then
    "$PY" experiments/python_corpus.py --output .cache/pycorpus-fp8 --max-train-mb 48 --max-heldout-mb 1
    "$PY" -m curtail.cli prepare-data .cache/pycorpus-fp8/train.txt --heldout .cache/pycorpus-fp8/heldout.txt \
        --vocab-size 65536 --num-proc "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --output .cache/pycorpus-fp8-d20 --json
fi
"$PY" experiments/fp8_quality.py --shards .cache/pycorpus-fp8-d20 --preset d20 --steps 300 --batch-size 16 \
    --micro 16 --profile --output-dir .cache/fp8 "$@"
