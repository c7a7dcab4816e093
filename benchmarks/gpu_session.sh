#!/usr/bin/env bash
# Everything that needs a GPU, in one call sized for a short lease (15 minutes of device time, the
# machine's start included; one call may run 10 minutes). Phases run in priority order, each under a
# timeout that is the smaller of its own limit and what is left of BUDGET_S, so the call always ends in
# time with every log written; a phase that runs out of time is cut and the next ones are skipped.
#
#   bash benchmarks/gpu_session.sh                   # all phases, in this order:
#     build       the extension for this GPU (pip install -e .; 23 s on the H200)
#     tests       the test files with GPU tests (TESTS; the others run on CPU in CI), RESNET_FAST_AUTOTUNE=0
#                 (one fixed config per family; tests/test_tuning.py pins and checks every autotune
#                 candidate), spread over TEST_WORKERS processes (pytest-xdist): compiling is CPU work
#     table       a fresh machine with the package's committed table (first_call.py --case table: 14 s
#                 for resnet50, batch 256, bf16 on the H200); the benchmarks then reuse its caches
#     models      the headline whole-model benchmarks (eager, compile, compile + freezing, resnet_fast),
#                 autotuning on (shapes missing from the table are timed in their warm-up)
#     host        benchmarks/triton_host_cost.py --profile: the host time of each batch-1 convolution on
#                 the Triton and torch backends, of whole batch-1 forwards (resnet_fast's, torchvision's),
#                 and where the time goes (batch-1 eager is launch-bound: 15.8 ms on the H200 against
#                 torchvision's 4.0 ms, where the stub driver on a CPU machine gives 4.7 ms for the same
#                 code's features)
#     main        python -m resnet_fast (resnet50, batch 256, bf16)
#     kernels     the headline kernel benchmarks (per-layer table, stem, add_relu, batch_norm_act)
#     first-call  benchmarks/first_call.py cold (empty Triton and tuning caches, no table: 75 s on the
#                 H200), then warm (a second process: 0.6 s)
#     profile     where the time goes: benchmarks/graph_profile.py (the batch-1 graph replay, kernel by
#                 kernel, resnet_fast's and torchvision's), then Nsight Compute's counters for the layers
#                 that lose most to cuDNN (benchmarks/ncu_layers.py under ncu --set full; skipped where
#                 there is no ncu); the raw and details CSVs go into logs.tar.gz
#   bash benchmarks/gpu_session.sh tests models      # only these phases (still in the order above)
#   BUDGET_S=300 BENCH_SELECT="" bash benchmarks/gpu_session.sh kernels   # every kernel benchmark
#   TESTS=tests/test_tuning.py TESTS_K=gather bash benchmarks/gpu_session.sh tests   # a rerun of some tests
#   LIMIT_TESTS=120 BENCH_K_MODELS="resnet50 and not compile" bash benchmarks/gpu_session.sh   # a shorter lease
#   HOST_ARGS="--shapes 4" bash benchmarks/gpu_session.sh host   # other arguments for triton_host_cost.py
#   GRAPH_PROFILE_ARGS="--calls 50" NCU_LAYERS_ARGS="--layers 3x3s1-64to64-56px-relu" \
#     bash benchmarks/gpu_session.sh profile                      # other arguments for the two profilers
#
# Results, at most 8 files, in $OUT (or ./gpu-out): summary.txt (device, versions, each phase's status
# and time, the first-call table, the main job's report), logs.tar.gz (every log, the tests' JUnit XML,
# the benchmark logs), bench-models.json and bench-kernels.json, BENCHMARKS.md (the report written into
# a copy), results.png, and tuned-<gpu>.json (the choices timed beyond the committed table, to merge
# into resnet_fast/kernels/tuned/<gpu>.json).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${WORK:-/tmp/resnet_fast-gpu}
logs="$work/logs"
rm -rf "$logs"  # the caches stay: a second call on a machine still warm reuses them
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
budget=${BUDGET_S:-540}
select=${BENCH_SELECT--m headline}
workers=${TEST_WORKERS:-14}
phases=" ${*:-build tests table models host main kernels first-call profile} "
# The files with GPU tests; the rest are CPU tests that CI runs.
gpu_tests="tests/test_triton.py tests/test_launch.py tests/test_cuda_ext.py tests/test_cuda_graph.py \
tests/test_stem.py tests/test_conv_tma.py tests/test_tuning.py"
export out work logs select workers gpu_tests  # the phase functions run in a child bash
start=$SECONDS
summary="$out/summary.txt"
: > "$summary"

say() { echo "$*" | tee -a "$summary"; }

# run_phase NAME LIMIT COMMAND...: COMMAND under min(LIMIT, budget left - 20 s), output to logs/NAME.log.
# LIMIT_<NAME> (first-call: LIMIT_FIRST_CALL) overrides LIMIT, to fit a shorter lease.
run_phase() {
  local name=$1 limit=$2
  shift 2
  local override="LIMIT_${name//-/_}"
  override=${override^^}
  limit=${!override:-$limit}
  [[ "$phases" == *" $name "* ]] || return 0
  local left=$((budget - (SECONDS - start) - 20))
  if ((left < 30)); then
    say "phase $name: skipped, ${left}s of the budget left"
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  # SIGINT first: pytest then still writes its JUnit XML and benchmark JSON for what has run.
  # Through bash, since a phase may be one of the (exported) functions below; timeout signals the whole
  # process group, so the python under it gets the SIGINT too.
  timeout -s INT -k 15 "$limit" bash -c '"$@"' "$name" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  say "phase $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)$([[ $rc == 124 ]] && echo ', cut at its limit')"
  tail -15 "$logs/$name.log"
  return 0
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'triton', triton.__version__)"
  date -u +"%Y-%m-%d %H:%M UTC"; git log -1 --format="commit %h %s"
} 2>&1 | tee -a "$summary"

# The extension must be built against this machine's torch: a _C built elsewhere does not load.
build() {
  rm -f resnet_fast/_C*.so
  python3 -m pip install -q --no-deps --no-index --no-build-isolation -e .
}
export -f build
run_phase build 90 build

tests() {
  local parallel=()
  python3 -c "import xdist" 2>/dev/null && parallel=(-n "$workers")
  # shellcheck disable=SC2086  # TESTS is a list of words
  # The CPU builds of the extension (emulated kernels, the mirror backend) are CI's, not the GPU's.
  TRITON_CACHE_DIR="$work/triton-tests" RESNET_FAST_AUTOTUNE=0 python3 -m pytest ${TESTS:-$gpu_tests} "${parallel[@]}" -q -ra \
    -p no:cacheprovider -m "not slow" -k "${TESTS_K-not emulated and not mirror}" \
    --ignore=tests/test_packaging.py --ignore=tests/test_cmake_build.py \
    --durations=25 --junitxml="$logs/tests.xml"
}
export -f tests
run_phase tests 200 tests

# The benchmark phases share the table case's Triton cache and tuning cache.
rm -rf "$work/table"  # a fresh machine: empty caches, the package's committed table
export TRITON_CACHE_DIR="$work/table/triton" RESNET_FAST_TUNING_CACHE="$work/table/tuning"
run_phase table 60 python3 benchmarks/first_call.py --case table --work "$work/table" \
  --json "$logs/first-call-table.json"
bench() {  # bench NAME FILE: one benchmark file, JSON to $out/bench-NAME.json
  # BENCH_K_<NAME> (BENCH_K_MODELS, BENCH_K_KERNELS) narrows one file's selection with -k.
  local k="BENCH_K_${1^^}"
  # shellcheck disable=SC2086  # BENCH_SELECT is a list of words
  python3 -m pytest "benchmarks/$2" --benchmark-only $select ${!k:+-k "${!k}"} -q -ra -p no:cacheprovider \
    --benchmark-json="$out/bench-$1.json"
}
export -f bench
run_phase models 180 bench models test_models.py
# shellcheck disable=SC2086  # HOST_ARGS is a list of words
run_phase host 60 python3 -m benchmarks.triton_host_cost ${HOST_ARGS---profile}
run_phase main 60 python3 -m resnet_fast
run_phase kernels 120 bench kernels test_kernels.py
cp "$RESNET_FAST_TUNING_CACHE"/*.json "$work/" 2>/dev/null  # what was timed beyond the committed table
run_phase first-call 150 python3 benchmarks/first_call.py --case cold --case warm --work "$work/first-call" \
  --json "$logs/first-call.json"

# The profile phase's ncu report stays in $work (megabytes); its CSVs go into the logs.
profile() {
  # shellcheck disable=SC2086  # GRAPH_PROFILE_ARGS and NCU_LAYERS_ARGS are lists of words
  python3 -m benchmarks.graph_profile ${GRAPH_PROFILE_ARGS-} || return
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -z "$ncu" ]]; then
    echo "ncu: not found, so no hardware counters"
    return 0
  fi
  # shellcheck disable=SC2086
  "$ncu" --profile-from-start off --clock-control none --set full -f -o "$work/ncu-layers" \
    python3 -m benchmarks.ncu_layers run --manifest "$logs/ncu-manifest.txt" ${NCU_LAYERS_ARGS-} || return
  "$ncu" --import "$work/ncu-layers.ncu-rep" --csv --page raw > "$logs/ncu-layers-raw.csv" || return
  "$ncu" --import "$work/ncu-layers.ncu-rep" --csv --page details > "$logs/ncu-layers-details.csv"
  python3 -m benchmarks.ncu_layers summary "$logs/ncu-layers-raw.csv" "$logs/ncu-manifest.txt"
}
export -f profile
run_phase profile 150 profile

runs=()
for json in "$out"/bench-*.json; do [[ -s "$json" ]] && runs+=("$json"); done
if ((${#runs[@]})); then
  cp BENCHMARKS.md "$out/BENCHMARKS.md"
  python3 benchmarks/report.py "${runs[@]}" --markdown "$out/BENCHMARKS.md" --plot "$out/results.png" \
    > "$logs/report.log" 2>&1 || say "report failed: see logs/report.log"
fi
for table in "$work"/*.json; do
  [[ -f "$table" ]] && cp "$table" "$out/tuned-$(basename "$table")"
done
{
  echo "--- first call (benchmarks/first_call.py)"
  cat "$logs/first-call.log" "$logs/table.log" 2>/dev/null | grep -E "^(case|cold|warm|table) " | uniq
  echo "--- host time per batch-1 convolution and forward (benchmarks/triton_host_cost.py)"
  grep -E "^[0-9]+x[0-9]+s|^shape |^sum over|^driver|^batch-1 resnet50|^  (resnet_fast|torchvision) |^ops of" \
    "$logs/host.log" 2>/dev/null
  echo "--- where the time goes (benchmarks/graph_profile.py, benchmarks/ncu_layers.py)"
  grep -vE "^(==|USDT|ERROR:|WARNING:)" "$logs/profile.log" 2>/dev/null | tail -80
  echo "--- main job"
  tail -25 "$logs/main.log" 2>/dev/null
  echo "--- failed or erroring tests"
  grep -hE "^(FAILED|ERROR) " "$logs/tests.log" 2>/dev/null | head -60
  echo "total: $((SECONDS - start)) s"
} >> "$summary"
tar -czf "$out/logs.tar.gz" -C "$work" logs
tail -n 40 "$summary"
