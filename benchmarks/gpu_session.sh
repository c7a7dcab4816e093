#!/usr/bin/env bash
# Everything that needs a GPU, in one call (a lent GPU machine's time is short): build the extension for
# the visible GPU, run the whole test suite there (GPU tests included), run the headline benchmarks and
# turn them into tables. Results and logs go to $OUT (or ./gpu-out). No network needed.
#
#   bash benchmarks/gpu_session.sh            # headline benchmarks
#   BENCH_SELECT="" bash benchmarks/gpu_session.sh   # every benchmark (8-12 min estimated)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
select=${BENCH_SELECT--m headline}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'triton', triton.__version__)" | tee -a "$out/device.txt"

# The extension must be built against this machine's torch: a _C built elsewhere does not load.
rm -f resnet_fast/_C*.so
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }

python3 -m pytest tests -q -x -p no:cacheprovider > "$out/tests.log" 2>&1
tests_rc=$?
tail -25 "$out/tests.log"

# shellcheck disable=SC2086
python3 -m pytest benchmarks --benchmark-only $select -q -p no:cacheprovider \
  --benchmark-json="$out/bench.json" > "$out/bench.log" 2>&1
bench_rc=$?
tail -15 "$out/bench.log"
cp BENCHMARKS.md "$out/BENCHMARKS.md"
python3 benchmarks/report.py "$out/bench.json" --markdown "$out/BENCHMARKS.md" --plot "$out/results.png" \
  > "$out/report.log" 2>&1 || tail -5 "$out/report.log"
echo "tests rc=$tests_rc, benchmarks rc=$bench_rc; files in $out"
exit $(( tests_rc || bench_rc ))
