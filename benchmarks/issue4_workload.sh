#!/usr/bin/env bash
# Issue 4's workload at 24 GiB, batch 1, prompts 512 and 2048, 128 new tokens, the adaptive plan
# twice per model in one process (each policy re-plans), after the whole GPU suite of tests/engine.
#
#   OUT=results_dir [BUDGET_S=570] [MODELS="phi-3.5-moe mixtral-8x7b"] [SKIP_TESTS=1] [AMX_SWEEP=0] benchmarks/issue4_workload.sh
set -uo pipefail
OUT=${OUT:?set OUT to a results directory}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-570}
MODELS=${MODELS:-phi-3.5-moe mixtral-8x7b}
SKIP_TESTS=${SKIP_TESTS:-0}
left() { local cap=$1 rest=$((BUDGET_S - SECONDS)); echo $((rest < cap ? (rest > 1 ? rest : 1) : cap)); }
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$SKIP_TESTS" != 1 ]; then
  timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine > "$OUT/gpu_tests.txt" 2>&1
  grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -3
fi
amx_sweep() {  # issue 7's untried AMX schedule: K unblocked (accumulators never reloaded), torch beside it
  echo "== AMX K-block sweep ($SECONDS s)"
  timeout "$(left 120)" python3 benchmarks/cpu_kernel_bench.py --sweep-only --models phi-3.5-moe --sweep-decode "" \
    --sweep-prefill 128,256,512 --setting base: --setting torch: --setting k1024:amx_k_block=1024 \
    --setting kfull:amx_k_block=8192 --setting kfull_nopack:amx_k_block=8192,amx_pack_min_tiles=99 \
    --out "$OUT/amx_kblock_sweep.json" > "$OUT/amx_kblock_sweep.txt" 2>&1
  grep "sweep " "$OUT/amx_kblock_sweep.txt"
}
for model in $MODELS; do
  echo "== $model ($SECONDS s)"
  timeout "$(left 260)" python3 benchmarks/partition_bench.py --model "$model" --budget 24GiB --build-policy adaptive \
    --policies adaptive,adaptive --prompt-len 512,2048 --new-tokens 128 --sweep "" --final-tokens 0 \
    --out "$OUT/issue4_$model.json" > "$OUT/issue4_$model.txt" 2>&1
  grep -vE "^\s*$" "$OUT/issue4_$model.txt" | tail -14
  [ "${AMX_SWEEP:-1}" = 1 ] && [ "$model" = phi-3.5-moe ] && amx_sweep
done
echo "done at $SECONDS s"
