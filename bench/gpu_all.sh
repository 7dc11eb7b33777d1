#!/usr/bin/env bash
# One call on a GPU machine: build the extension, print the doctor's table of the ops on this GPU, run the cuda
# tests, compute-sanitizer (memcheck, racecheck, synccheck) on small cases of every op, the GPU Gram benchmark
# and the trainer benchmark on the GPU.
#   bash bench/gpu_all.sh OUTDIR
# Writes OUTDIR/{build.log, doctor.txt, pytest_cuda.log, sanitizer_{memcheck,racecheck,synccheck}.log, bench.log,
# gpu_gram.json, gpu_gram.md, bench_flow.log, flow_*.json, nvidia-smi.txt}.
# Exits non-zero if the build, the doctor, the tests or a sanitizer run fail (the benchmarks still run after
# failures).  Without compute-sanitizer on PATH (or under $CUDA_HOME/bin) the sanitizer step is skipped with a
# message.
set -u
OUT=${1:?usage: bench/gpu_all.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
export NTK_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export NTK_FAST_NVCC_FLAGS=${NTK_FAST_NVCC_FLAGS:--Xptxas=-v}
echo "== build" | tee "$OUT/build.log"
if ! $PY -m pip install --no-build-isolation -e . >> "$OUT/build.log" 2>&1; then
  echo "build failed; see $OUT/build.log"; tail -40 "$OUT/build.log"; exit 1
fi
grep -E "ptxas info *: (Used|Function properties)|spill" "$OUT/build.log" | tail -12
echo "== doctor (each op on this GPU against its torch reference)"
$PY -m ntk_fast doctor > "$OUT/doctor.txt" 2>&1
DOCTOR_RC=$?
cat "$OUT/doctor.txt"
echo "== tests"
$PY -m pytest -m cuda tests/ -q -rs > "$OUT/pytest_cuda.log" 2>&1
TEST_RC=$?
tail -15 "$OUT/pytest_cuda.log"
echo "== compute-sanitizer (small cases of every op: bench/sanitize_ops.py)"
SAN_RC=0
SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && SAN=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): sanitizer runs skipped" | tee "$OUT/sanitizer_skipped.txt"
else
  for tool in memcheck racecheck synccheck; do
    "$SAN" --tool "$tool" --error-exitcode 1 --print-limit 50 $PY bench/sanitize_ops.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    echo "$tool: rc=$rc ($(grep -cE "^========= (Invalid|Error|Race|Barrier|.*hazard)" "$OUT/sanitizer_$tool.log") findings; $(tail -1 "$OUT/sanitizer_$tool.log"))"
    [ $rc -ne 0 ] && SAN_RC=$rc
  done
fi
echo "== benchmark"
$PY bench/gpu_gram.py "$OUT" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
tail -20 "$OUT/bench.log"
echo "== trainer benchmark (issue 4's GPU targets: n=10000, h=100 and 1000, ensemble of 10)"
$PY bench/bench_flow.py --device cuda --n 10000 --h 100 1000 --ensemble 10 --out "$OUT" > "$OUT/bench_flow.log" 2>&1
FLOW_RC=$?
tail -8 "$OUT/bench_flow.log"
echo "doctor rc=$DOCTOR_RC tests rc=$TEST_RC sanitizer rc=$SAN_RC bench rc=$BENCH_RC flow rc=$FLOW_RC; results in $OUT"
[ $DOCTOR_RC -eq 0 ] && [ $TEST_RC -eq 0 ] && [ $SAN_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $FLOW_RC -eq 0 ]
