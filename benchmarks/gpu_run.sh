#!/usr/bin/env bash
# One GPU session, prepared: on a fresh H100/H200 (torch, triton 3.6, no registry) with the carry
# of ../shared/gpu/prepare-carry (".gpu": bitsandbytes), install fastpeft offline, run the GPU
# tests, the sm_90 compile table with the machine's triton, the static model, and every benchmark
# table on a thinned grid (FASTPEFT_BENCH_GRID=session), inside BUDGET_S seconds (default 450,
# under the 8 minutes a lease allows). Everything lands in benchmarks/results/gpu-run/ (and
# $OUT/gpu-run when $OUT is set, so that the device tool brings it back).
#
#   device:  benchmarks/gpu_run.sh                    (run from anywhere; carry [".gpu"])
#   here:    benchmarks/gpu_run.sh --dry-run          (CPU: the same stages, quick CPU configs)
#
# Each stage has its own timeout, so a slow stage costs only its share; a stage that fails is
# logged and the others still run. The exit code is 1 when any stage failed or timed out.
# BENCHES (space-separated benchmark names) restricts the benchmark stage (default: all);
# SKIP_TESTS=1 skips the dry run's GPU-test collection.
set -uo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
res=${RESULTS_DIR:-$root/benchmarks/results/gpu-run}
mkdir -p "$res"
py=${PYTHON:-python3}
benches=${BENCHES:-"lora_linear qlora_matmul dora prefix_attention train_step"}
start=$(date +%s)
budget=${BUDGET_S:-450}
status=0
log() { echo "[gpu_run +$(( $(date +%s) - start ))s] $*" | tee -a "$res/gpu_run.log"; }

# stage NAME SECONDS CMD...: run CMD with a timeout, output to $res/NAME.log
stage() {
    local name=$1 secs=$2
    shift 2
    local left=$(( budget - ($(date +%s) - start) ))
    [ "$secs" -gt "$left" ] && secs=$left
    if [ "$secs" -le 5 ]; then
        log "SKIP $name: budget spent"; status=1; return
    fi
    log "START $name (timeout ${secs}s): $*"
    timeout --kill-after=10 "$secs" "$@" >"$res/$name.log" 2>&1
    local rc=$?
    tail -n 3 "$res/$name.log" | sed 's/^/    /' | tee -a "$res/gpu_run.log"
    if [ $rc -ne 0 ]; then
        log "FAIL $name (rc=$rc$([ $rc -eq 124 ] && echo ', timed out'))"; status=1
    else
        log "OK $name"
    fi
}

export FASTPEFT_BENCH_GRID=session TRITON_DEFAULT_FP_FUSION=1
if [ $DRY -eq 0 ]; then
    [ -d "$root/.gpu/site" ] && export PYTHONPATH="$root/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
    stage install 60 "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    stage environment 30 bash -c "nvidia-smi; $py -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
    stage gpu_tests 120 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_lora_linear_op.py tests/test_lora_epilogue.py tests/test_nf4_prmt.py tests/test_prefix_attention_op.py \
        tests/test_nf4_csrc.py tests/test_qlora_model.py tests/test_dora_op.py tests/test_patch.py \
        tests/test_autocast.py tests/test_distributed.py
    stage aot_sm90 60 "$py" benchmarks/aot.py --dtype bf16 --json "$res/aot.json"
    stage roofline 60 "$py" benchmarks/roofline.py
    # the whole QLoRA step's peak memory vs peft + bitsandbytes (issue target: at least 50% less)
    stage train_memory 90 "$py" benchmarks/train_memory.py --models 1b --seqs 2048 --out "$res"
    quick=""
    per=45
else
    log "dry run (CPU): install, nvidia-smi, aot and roofline skipped; GPU tests collected, not run"
    stage environment 30 "$py" -c "import torch, triton; print(torch.__version__, triton.__version__)"
    [ "${SKIP_TESTS:-0}" = 1 ] || stage gpu_tests 120 "$py" -m pytest -q --collect-only -m gpu -p no:cacheprovider tests/test_lora_linear_op.py tests/test_lora_epilogue.py tests/test_nf4_prmt.py tests/test_prefix_attention_op.py \
        tests/test_nf4_csrc.py tests/test_qlora_model.py tests/test_dora_op.py tests/test_patch.py \
        tests/test_autocast.py tests/test_distributed.py
    quick="--quick"
    per=120
fi
for b in $benches; do
    # one run.py per benchmark, each into its own folder: a timed-out one loses only its own table
    stage "bench_$b" "$per" "$py" benchmarks/run.py $quick --only "$b" --out "$res/$b"
done
log "done in $(( $(date +%s) - start ))s (budget ${budget}s), status $status; results in $res"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ $DRY -eq 0 ]; then
    cp -r "$res" "$OUT/gpu-run"
fi
exit $status
