#!/usr/bin/env bash
# The GPU checks (GPU kernel targets; EOT-PGD batched vs the per-sample loop) as one prepared run, for a
# short session on an H100/H200: build the CUDA kernels, run the GPU tests on both GPU backends, and the
# GPU benchmarks whose figures go into benchmarks/RESULTS.md § GPU. Each stage has its own time cap and
# the whole run stops starting stages at a deadline, so the run fits one ten-minute job; the logs and
# JSON land under $OUT.
#
#   bash benchmarks/gpu_session.sh                   # every stage, in the order below
#   bash benchmarks/gpu_session.sh build launches    # just these stages
#
# Stages (cap in seconds):
#   env       nvidia-smi, torch / triton / nvcc versions                                     (20)
#   build     pip install -e . --no-build-isolation --no-deps, sm_90 only, all cores        (300)
#   launches  tests/ops/test_gpu_only.py: one launch fwd / bwd, profiler, info, no copy     (120)
#   bench     benchmarks/test_bench_cuda.py, the default matrix (the GPU targets)            (300)
#   eot-pgd   benchmarks/test_bench_attacks.py on cuda (EOT-PGD batched vs loop, >= 3x)     (180)
#   tests     every GPU case of tests/ops (-m gpu), stopping at the first failure            (remaining)
#
# Environment: OUT (default ./gpu-out), PY (default python3), FASTDIV_GPU_DEADLINE (seconds after which no
# stage starts and the running one is cut, default 570: under a ten-minute limit per call).
# --no-deps: the GPU machine is expected to have torch, triton and the test tools but no network. $OUT
# gets at most 8 files: session.log (the summary), one log per stage that ran, and the benchmark JSON files.
set -uo pipefail

OUT=${OUT:-gpu-out}
PY=${PY:-python3}
DEADLINE=${FASTDIV_GPU_DEADLINE:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0  # tests/conftest.py defaults to the interpreter; compile here
SUMMARY="$OUT/session.log"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# run_stage NAME CAP FUNCTION: runs the (exported) shell function with its output in $OUT/NAME.log, for at most CAP seconds and never
# past the deadline; the summary gets the exit status, the time and the log's last lines.
run_stage() {
  local name=$1 cap=$2 left
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    say "== $name: not started (deadline: ${SECONDS}s of ${DEADLINE}s used)"
    return 1
  fi
  ((cap > left)) && cap=$left
  say "== $name (cap ${cap}s, at ${SECONDS}s)"
  local start=$SECONDS rc
  timeout --kill-after=10 "$cap" bash -ec "$*" >"$OUT/$name.log" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && say "   cut at its cap"
  say "   rc=$rc in $((SECONDS - start))s"
  tail -n 8 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
  return "$rc"
}

stage_env() {
  nvidia-smi
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
  nvcc --version | tail -n 2
}

stage_build() {
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTDIV_FORCE_CUDA=1 \
    "$PY" -m pip install -v -e . --no-build-isolation --no-deps && "$PY" -m fastdiv info
}

stage_launches() {
  "$PY" -m pytest tests/ops/test_gpu_only.py -q -x -p no:cacheprovider -k "launches or profiler or info or no_copy"
}

stage_bench() {
  "$PY" -m pytest benchmarks/test_bench_cuda.py -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/bench-cuda.json" && "$PY" benchmarks/report.py "$OUT/bench-cuda.json"
}

stage_eot_pgd() {
  FASTDIV_BENCH_DEVICE=cuda "$PY" -m pytest benchmarks/test_bench_attacks.py -q -p no:cacheprovider \
    --benchmark-only --benchmark-json="$OUT/bench-eot-pgd.json"
}

stage_tests() {
  "$PY" -m pytest tests/ops -m gpu -q -x -p no:cacheprovider
}

export OUT PY
export -f stage_env stage_build stage_launches stage_bench stage_eot_pgd stage_tests

declare -A CAPS=([env]=20 [build]=300 [launches]=120 [bench]=300 [eot-pgd]=180 [tests]=$DEADLINE)
stages=("$@")
((${#stages[@]})) || stages=(env build launches bench eot-pgd tests)
for s in "${stages[@]}"; do
  [[ -n ${CAPS[$s]:-} ]] || { say "unknown stage '$s' (known: ${!CAPS[*]})"; exit 2; }
done

failed=0
# Without a CUDA device every GPU test and benchmark skips, which pytest counts as a pass.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  say "no CUDA device visible to $PY: the GPU tests and benchmarks below will skip (the run counts as failed)"
  failed=1
fi
for s in "${stages[@]}"; do
  run_stage "$s" "${CAPS[$s]}" "stage_${s//-/_}"
  rc=$?
  ((rc == 0)) || failed=1
  # nothing after a failed build can run on the GPU backends
  if [[ $s == build && $rc != 0 ]]; then
    say "build failed: later stages skipped"
    break
  fi
done
say "== done in ${SECONDS}s, $([[ $failed == 0 ]] && echo 'every stage passed' || echo 'some stage failed')"
exit "$failed"
