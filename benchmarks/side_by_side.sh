#!/usr/bin/env bash
# ScheInfer against llama.cpp on one machine in one run (speeds differ between machines of the pool:
# compare only numbers taken in the same run). Builds llama-bench once from the carried tarball
# (.cache/llamacpp, see benchmarks/README.md "llama.cpp baseline"), then for each model: llama.cpp
# scaled to the full model, then ScheInfer's adaptive plan and the cpu-experts policy at BUDGET.
#
#   OUT=results_dir BUDGET=24GiB NEW_TOKENS=32 benchmarks/side_by_side.sh mixtral-8x7b [phi-3.5-moe]
#
# Each step writes its JSON under $OUT as it ends, so a run cut short keeps what it finished.
set -uo pipefail
OUT=${OUT:?set OUT to a results directory}
BUDGET=${BUDGET:-24GiB}
NEW_TOKENS=${NEW_TOKENS:-32}
THREADS=${THREADS:-16}
WORK_DIR=${WORK_DIR:-/tmp/llamacpp}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT"
python3 benchmarks/llamacpp_bench.py --build-only --work-dir "$WORK_DIR" --model "$1" --out "$OUT/llamacpp_build.json" \
  2>&1 | tail -3
for model in "$@"; do
  echo "== $model: llama.cpp"
  python3 benchmarks/llamacpp_bench.py --skip-build "$WORK_DIR/build" --work-dir "$WORK_DIR" --model "$model" --threads "$THREADS" \
    --out "$OUT/llamacpp_$model.json" 2>&1 | tail -4
  echo "== $model: ScheInfer"
  python3 benchmarks/partition_bench.py --model "$model" --budget "$BUDGET" --build-policy adaptive \
    --policies adaptive,cpu-experts,adaptive --prompt-len 512 --new-tokens "$NEW_TOKENS" --sweep "" \
    --final-tokens 0 --out "$OUT/scheinfer_$model.json" 2>&1 | tail -12
done
