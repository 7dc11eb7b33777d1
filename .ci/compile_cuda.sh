#!/usr/bin/env bash
# CI step: compile the CUDA kernels (no GPU needed) in a separate CUDA-13 torch environment and check
# that the module imports and registers a CPU and a CUDA kernel for every op.  A compile error fails CI.
#   .ci/compile_cuda.sh            # venv at $NTK_FAST_CU_VENV (default: <repo>/.venv-cu), created if missing
# Build output goes to build-cu/ and the module to a scratch copy, so the CPU build in the checkout is
# left alone.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${NTK_FAST_CU_VENV:-$REPO/.venv-cu}
PY_BOOT=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 numpy setuptools wheel ninja
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, sys; v = torch.version.cuda; print("torch", torch.__version__, "cuda", v); sys.exit(0 if v else 1)' \
  || { echo "compile_cuda: the torch in $VENV is not a CUDA build"; exit 1; }
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# CI compiles sm_90 only (H100/H200; about 5x faster than the users' default of setup.py,
# "8.0;8.6;8.9;9.0+PTX").  Set TORCH_CUDA_ARCH_LIST to check more.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# ptxas reports registers and spills per kernel; a kernel that spills fails CI (NTK_FAST_ALLOW_SPILLS=1 to
# only report).
export NTK_FAST_NVCC_FLAGS="${NTK_FAST_NVCC_FLAGS:-} -Xptxas=-v"
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export NTK_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
export PATH="$CUDA_HOME/bin:$PATH"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "compile_cuda: no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; }

# Build from a scratch copy of the sources so that the checkout's ntk_fast/_C*.so (CPU build) stays.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$REPO/setup.py" "$REPO/pyproject.toml" "$REPO/csrc" "$REPO/ntk_fast" "$WORK/"
rm -f "$WORK"/ntk_fast/_C*.so
mkdir -p "$REPO/build-cu"
echo "== compiling (log: build-cu/compile.log)"
if ! (cd "$WORK" && "$PY" setup.py build_ext --inplace --build-temp "$REPO/build-cu/temp") > "$REPO/build-cu/compile.log" 2>&1; then
  grep -E "error|Error" "$REPO/build-cu/compile.log" | head -40
  echo "compile_cuda: FAILED"
  exit 1
fi
# ptxas -v prints "Compiling entry function '<mangled>' for 'sm_90'", then "<n> bytes spill stores, <m> bytes
# spill loads" and "Used <r> registers".
grep -E "ptxas info *: Used|spill" "$REPO/build-cu/compile.log" || true
SPILLS=$(grep -cE "[1-9][0-9]* bytes spill (stores|loads)" "$REPO/build-cu/compile.log" || true)
if [ "${SPILLS:-0}" != "0" ]; then
  grep -B3 -E "[1-9][0-9]* bytes spill (stores|loads)" "$REPO/build-cu/compile.log" | grep -E "entry function|spill" | head -20
  if [ "${NTK_FAST_ALLOW_SPILLS:-0}" != "1" ]; then
    echo "compile_cuda: FAILED: ptxas reports register spills (above)"
    exit 1
  fi
  echo "compile_cuda: register spills reported (allowed by NTK_FAST_ALLOW_SPILLS=1)"
fi
cp "$WORK"/ntk_fast/_C*.so "$REPO/build-cu/"
echo "== import check"
(cd "$WORK" && "$PY" - <<'PYEOF'
import torch
import ntk_fast._C  # noqa: F401
has = torch._C._dispatch_has_kernel_for_dispatch_key
# every op with a CPU kernel (the namespace's registrations, so a new op is checked without editing this list),
# and at least the ops known when this check was written
cpu = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
ops = sorted(x.split("::", 1)[1] for x in cpu if x.startswith("ntk_fast::"))
known = {"gram", "gram.out", "gram_full", "gram_full.out", "flow_step", "flow_grad_stats", "flow_loss",
         "softplus_act", "kernel_flow_step", "limit_kernels"}
assert known <= set(ops), f"ops without a CPU kernel: {sorted(known - set(ops))}"
for op in ops:
    for key in ("CPU", "CUDA"):
        assert has("ntk_fast::" + op, key), f"ntk_fast::{op} has no {key} kernel"
print("ntk_fast._C imports; every op has CPU and CUDA kernels:", ", ".join(ops))
PYEOF
)
echo "compile_cuda: OK"
