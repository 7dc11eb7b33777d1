"""Build the extension ntk_fast._C.

CPU kernels are always built.  CUDA kernels (``csrc/**/*.cu``) are added when the
installed torch is a CUDA build (``torch.version.cuda``) and ``nvcc`` is found;
``NTK_FAST_CUDA=0`` / ``NTK_FAST_CUDA=1`` forces either way.  The decision never
looks at ``torch.cuda.is_available()``: build machines need no GPU.

Install with ``pip install --no-build-isolation -e .`` so that the extension is
compiled against the torch that is already installed.
"""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("NTK_FAST_CUDA")
    if forced is not None and forced.strip() != "":
        return forced.strip() not in ("0", "false", "False", "no")
    has_nvcc = shutil.which("nvcc") is not None or (
        CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and has_nvcc


def cxx_std() -> str:
    # torch >= 2.14's headers require C++20 (ATen.h: "#error C++20 or later"); older ones build with C++17.
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


# GPU architectures compiled for users when TORCH_CUDA_ARCH_LIST is not set: A100 (8.0), RTX 30xx / A10 /
# A40 (8.6), RTX 40xx / L4 / L40 (8.9), H100 / H200 (9.0), and PTX of 9.0 that the driver compiles for newer
# GPUs (Blackwell).  cp.async and the tf32 / fp64 tensor cores need sm_80 or newer.  CI compiles 9.0 only
# (.ci/compile_cuda.sh).
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx = ["-O3", "-g0", "-fopenmp", cxx_std(), "-DPy_LIMITED_API=0x03090000"]
    link = ["-fopenmp", "-ldl"]  # dlsym (csrc/flow/act_cpu.cpp); part of libc from glibc 2.34, harmless there
    if want_cuda():
        if torch.version.cuda is None:
            raise RuntimeError("NTK_FAST_CUDA=1 but the installed torch is a CPU-only build")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        # No --use_fast_math: it would flush float32 subnormals and approximate division and exp in every
        # kernel (the "highest" Gram, the flow and solver kernels).  The one kernel meant to be fast-math,
        # softplus_act in float32 (csrc/flow/act_cuda.cu), calls the intrinsics __expf / __fdividef itself.
        nvcc = ["-O3", cxx_std(), "-lineinfo", "-DNTK_FAST_WITH_CUDA"]
        # Extra nvcc flags, e.g. NTK_FAST_NVCC_FLAGS="-Xptxas=-v" for the register/spill report.
        nvcc += os.environ.get("NTK_FAST_NVCC_FLAGS", "").split()
        return CUDAExtension("ntk_fast._C", cpp + cu, py_limited_api=True,
                             extra_compile_args={"cxx": cxx + ["-DNTK_FAST_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=link)
    return CppExtension("ntk_fast._C", cpp, py_limited_api=True,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="ntk_fast",
    version="0.1.0",
    description="Fast empirical NTK Gram matrices and lazy/feature training dynamics of deep FC nets",
    packages=find_packages(include=["ntk_fast", "ntk_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"test": ["pytest", "scipy", "pytest-benchmark"],
                    # PyTorch peers of the side-by-side benchmark (python -m ntk_fast.bench_runner); nngeometry
                    # needs torchvision: pin the release matching the installed torch (0.28 for torch 2.13) or
                    # pip upgrades torch.  neural-tangents needs old jax/numpy: its own venv (setup_peers.sh).
                    "peers": ["nngeometry", "asdfghjkl"],
                    "bench": ["pytest-benchmark", "matplotlib"]},
)
