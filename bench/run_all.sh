#!/usr/bin/env bash
# Run every benchmark, collect their JSON lines and write the report.
#
#   bash bench/run_all.sh          # full sizes (~30-40 min on 2 cores); rewrites BENCHMARKS.md and
#                                  # bench/results.jsonl
#   bash bench/run_all.sh --quick  # smoke sizes (a few minutes); writes into a temporary directory
#                                  # (or $BENCH_OUT) and leaves BENCHMARKS.md alone
#
# Needs the bench extra (TRL) and the test extra (vLLM for bench_score.py): `make bench` installs both.
# PY selects the interpreter (default .venv/bin/python). A failing benchmark is recorded and the others
# still run; the exit status is non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1

if [ "$QUICK" = 1 ]; then
    OUT=${BENCH_OUT:-$(mktemp -d /tmp/dpocache-bench.XXXXXX)}
    RESULTS=$OUT/results.jsonl
    REPORT=$OUT/BENCHMARKS.md
    RUN_COMMAND="bash bench/run_all.sh --quick"
    BENCHES=(
        "bench/bench_padding.py --quick"
        "bench/bench_store.py --examples 500 --batches 20"
        "bench/bench_tokenize.py --rows 1000"
        "bench/bench_score.py --sequences 32 --repeats 1"
        "bench/bench_train.py --quick"
        "bench/bench_train.py --model smollm2 --quick"
        "bench/bench_scale.py --quick"
        "bench/bench_logps.py --repeats 1 --length 128"
    )
else
    OUT=bench
    RESULTS=bench/results.jsonl
    REPORT=BENCHMARKS.md
    RUN_COMMAND="bash bench/run_all.sh"
    BENCHES=(
        "bench/bench_padding.py"
        "bench/bench_store.py"
        "bench/bench_tokenize.py --rows 20000"
        "bench/bench_score.py"
        "bench/bench_train.py"
        "bench/bench_train.py --model smollm2"
        "bench/bench_scale.py"
        "bench/bench_logps.py"
    )
fi
mkdir -p "$OUT"
: > "$RESULTS"
"$PY" bench/report.py machine "$RESULTS"
status=0
for bench in "${BENCHES[@]}"; do
    # shellcheck disable=SC2086  # each entry is a script and its arguments
    "$PY" bench/report.py collect "$RESULTS" -- "$PY" $bench || status=1
done
"$PY" bench/report.py write "$RESULTS" "$REPORT" --run_command "$RUN_COMMAND" || status=1
echo "results: $RESULTS; report: $REPORT" >&2
exit $status
