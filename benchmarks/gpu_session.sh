#!/usr/bin/env bash
# Everything that needs a GPU, in as few calls as possible (a lent GPU machine's time is short): build
# the extension for the visible GPU, run the whole test suite there (GPU tests included), run the
# headline benchmarks and turn them into tables. Logs and results go to $OUT (or ./gpu-out).
#
#   bash benchmarks/gpu_session.sh              # build, tests, headline benchmarks, report
#   bash benchmarks/gpu_session.sh tests        # build and tests only
#   bash benchmarks/gpu_session.sh bench        # build, benchmarks and report only
#   BENCH_SELECT="" bash benchmarks/gpu_session.sh bench   # every benchmark, not just the headline set
#
# Each phase runs under `timeout $PHASE_TIMEOUT` (default 270 s), so a call that may last at most
# 10 minutes still returns its logs. The first forward of each conv shape compiles and autotunes the
# Triton kernel; RESNET_FAST_AUTOTUNE=0 uses one fixed config instead (quicker, for a tests-only call).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
phases=${*:-tests bench}
select=${BENCH_SELECT--m headline}
limit=${PHASE_TIMEOUT:-270}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'triton', triton.__version__)" | tee -a "$out/device.txt"

# The extension must be built against this machine's torch: a _C built elsewhere does not load.
rm -f resnet_fast/_C*.so
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }

rc=0
if [[ " $phases " == *" tests "* ]]; then
  timeout "$limit" python3 -m pytest tests -q -p no:cacheprovider --durations=15 > "$out/tests.log" 2>&1
  tests_rc=$?
  tail -40 "$out/tests.log"
  echo "tests rc=$tests_rc"
  rc=$(( rc || tests_rc ))
fi
if [[ " $phases " == *" bench "* ]]; then
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m pytest benchmarks --benchmark-only $select -q -p no:cacheprovider \
    --benchmark-json="$out/bench.json" > "$out/bench.log" 2>&1
  bench_rc=$?
  tail -15 "$out/bench.log"
  cp BENCHMARKS.md "$out/BENCHMARKS.md"
  python3 benchmarks/report.py "$out/bench.json" --markdown "$out/BENCHMARKS.md" --plot "$out/results.png" \
    > "$out/report.log" 2>&1 || tail -5 "$out/report.log"
  echo "benchmarks rc=$bench_rc"
  rc=$(( rc || bench_rc ))
fi
echo "files in $out"
exit "$rc"
