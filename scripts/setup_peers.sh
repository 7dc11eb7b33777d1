#!/usr/bin/env bash
# Environments of the benchmark's peers (python -m ntk_fast bench finds them in the repo root):
#   .venv-peers  torch (the same release as the main env), torchvision matching it, nngeometry, asdfghjkl,
#                matplotlib (also used for the plot when the main env has none)
#   .venv-nt     neural-tangents 0.6.5 with the jax/numpy pins that still work (docs/benchmarks.md)
# Idempotent; PYTHON=... picks the interpreter of the main env (default: .venv/bin/python or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TORCH_FULL=$("$MAIN_PY" -c 'import torch; print(torch.__version__)')
TORCH_VER=${TORCH_FULL%%+*}
# torchvision release paired with a torch release: 0.(minor + 15) since torch 2.0
TV_VER=$("$MAIN_PY" -c 'import torch; v=torch.__version__.split("+")[0].split("."); print(f"0.{int(v[1]) + 15}.*")')

if [ ! -x .venv-peers/bin/python ]; then python3 -m venv .venv-peers; fi
if ! .venv-peers/bin/python -c 'import nngeometry, asdl, matplotlib' 2>/dev/null; then
  # exactly the main env's torch (e.g. 2.13.0+cpu from a local wheel folder or the PyTorch CPU index);
  # plain PyPI last (there torch is a CUDA build of several GB)
  .venv-peers/bin/pip install -q "torch==${TORCH_FULL}" 2>/dev/null \
    || .venv-peers/bin/pip install -q --timeout 20 "torch==${TORCH_FULL}" --extra-index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || .venv-peers/bin/pip install -q "torch==${TORCH_VER}"
  .venv-peers/bin/pip install -q "torchvision==${TV_VER}" nngeometry asdfghjkl matplotlib "torch==${TORCH_VER}"
fi
echo "peers venv: $(.venv-peers/bin/python -c 'import torch, nngeometry, asdl; from importlib.metadata import version as v; print("torch", torch.__version__, "nngeometry", v("nngeometry"), "asdfghjkl", v("asdfghjkl"))')"

if [ ! -x .venv-nt/bin/python ]; then python3 -m venv .venv-nt; fi
if ! .venv-nt/bin/python -c 'import neural_tangents' 2>/dev/null; then
  .venv-nt/bin/pip install -q "jax==0.4.23" "jaxlib==0.4.23" "tf2jax==0.3.6" neural-tangents==0.6.5 "numpy<2" "scipy<1.14"
fi
echo "neural-tangents venv: $(TF_CPP_MIN_LOG_LEVEL=3 .venv-nt/bin/python -c 'import jax, neural_tangents as nt; print("jax", jax.__version__, "neural-tangents", nt.__version__)' 2>/dev/null)"
