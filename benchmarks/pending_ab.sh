#!/usr/bin/env bash
# One device call for what a session left unmeasured: the GPU tests of the changed parts, then an
# A/B of policies (partition_bench.py suffixes) on Phi-3.5-MoE at 24 GiB in one process (each
# policy re-plans, so the feedback starts afresh), then the whole GPU suite and Mixtral if time is
# left. Session 19 ran it for the period rule (POLICIES=adaptive~period,adaptive,adaptive~period,adaptive;
# benchmarks/README.md "Session 19"); the default now A/Bs session 18-19's head order and rotary
# tables, which had no switch then.
#
#   OUT=results_dir [BUDGET_S=560] [POLICIES=...] [SKIP_TESTS=1] benchmarks/pending_ab.sh  # ~5-9 min
#
# Each step writes under $OUT as it ends (partition_bench prints each policy's JSON line as it
# finishes), so a call cut short keeps what it finished.
set -uo pipefail
OUT=${OUT:?set OUT to a results directory}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-560}  # the whole script ends by then (a device call is cut at 600 s)
POLICIES=${POLICIES:-adaptive,adaptive~headlate,adaptive~rotarycomputed,adaptive,adaptive~headlate,adaptive~rotarycomputed}
SKIP_TESTS=${SKIP_TESTS:-0}
left() { local cap=$1 rest=$((BUDGET_S - SECONDS)); echo $((rest < cap ? (rest > 1 ? rest : 1) : cap)); }
nvidia-smi --query-gpu=name --format=csv,noheader
# 1. the GPU tests of sessions 18-19's changes (rotary tables on CUDA, the head before the last
#    collection with signalled jobs, the feedback), 2. the period-rule A/B on Phi-3.5-MoE, 3. the
#    whole GPU suite, 4. the A/B on Mixtral: the most valuable first, each within what is left
[ "$SKIP_TESTS" = 1 ] || timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider tests/engine/model/test_rotary.py \
  tests/engine/model/test_forward_order.py tests/engine/executor/test_stream_signal.py \
  tests/engine/executor/test_decode_feedback.py tests/engine/model/test_decode_graphs.py > "$OUT/gpu_tests_first.txt" 2>&1
[ "$SKIP_TESTS" = 1 ] || tail -1 "$OUT/gpu_tests_first.txt"
ab() {
  local model=$1 cap=$2
  echo "== $model: $POLICIES"
  timeout "$(left "$cap")" python3 benchmarks/partition_bench.py --model "$model" --budget 24GiB --build-policy adaptive \
    --policies "$POLICIES" --prompt-len 512 --new-tokens 64 --sweep "" \
    --final-tokens 0 --out "$OUT/ab_$model.json" > "$OUT/ab_$model.txt" 2>&1
  python3 - "$OUT/ab_$model.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    name, brace, rest = line.partition(" {")
    if name.startswith("adaptive") and brace:
        r = json.loads("{" + rest); f = r["decode_feedback"]
        print(f"{name:32} decode {r['decode_tok_s']:6.2f} tok/s  prefill {r['prefill_tok_s']:7.1f}  shift {f['shift']}"
              f"  moves {f['moves']} (period {f.get('period_moves', 0)}, holds {f.get('holds', 0)})  period {f['period_ms']:.3f} ms")
PY
}
ab phi-3.5-moe 340
if [ "$SKIP_TESTS" != 1 ] && [ $((BUDGET_S - SECONDS)) -gt 120 ]; then
  timeout "$(left 200)" python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine > "$OUT/gpu_tests.txt" 2>&1
  grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -3
fi
if [ $((BUDGET_S - SECONDS)) -gt 200 ]; then ab mixtral-8x7b 240; fi
