"""CPU checks of the CUDA Gram kernel's data-free logic (csrc/gram/gram_plan.h), compiled with the host C++
compiler: the choice of tile configuration for a GPU's shared memory, the tile map (every upper tile exactly
once), the walk over K chunks and the cp.async stage schedule.  Needs g++ (or $CXX); no GPU, no torch build."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")

F32, TF32, F64 = 0, 1, 2
KIB = 1024
# cudaDevAttrMaxSharedMemoryPerBlockOptin of the GPUs we build for.
OPTIN = {"H100/H200 (sm_90)": 227 * KIB, "A100 (sm_80)": 163 * KIB,
         "RTX 30xx/40xx, L4, L40, A10 (sm_86/89)": 99 * KIB}


@pytest.fixture(scope="module")
def plan_bin(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("gram_plan") / "gram_plan_test"
    subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "cpp" / "gram_plan_test.cpp"), "-o", str(exe)], check=True)
    return exe


def run(exe: Path, *args) -> str:
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def table(exe):
    rows = [list(map(int, line.split())) for line in run(exe, "table").splitlines()]
    return {r[0]: dict(variant=r[1], bm=r[2], stages=r[3], nt=r[4], smem=r[5]) for r in rows}


def test_table_sizes(plan_bin):
    """smem = (stages * 2 * BM * LDK + BM * LDC) * itemsize, recomputed here from the strides of gram_cuda.cu."""
    t = table(plan_bin)
    expect = {0: (3 * 2 * 128 * 20 + 128 * 144) * 4, 1: (3 * 2 * 64 * 20 + 64 * 72) * 4,
              2: (3 * 2 * 128 * 36 + 128 * 132) * 4, 3: (3 * 2 * 128 * 20 + 128 * 132) * 4,
              4: (3 * 2 * 64 * 36 + 64 * 68) * 4,
              5: (3 * 2 * 64 * 20 + 64 * 66) * 8, 6: (2 * 2 * 64 * 20 + 64 * 66) * 8}
    assert {i: r["smem"] for i, r in t.items()} == expect
    for r in t.values():
        assert r["smem"] <= 227 * KIB


@pytest.mark.parametrize("gpu", sorted(OPTIN))
@pytest.mark.parametrize("variant", [F32, TF32, F64])
def test_choice_fits_and_is_the_largest_that_fits(plan_bin, gpu, variant):
    t = table(plan_bin)
    optin = OPTIN[gpu]
    i, smem = map(int, run(plan_bin, "choose", variant, optin).split())
    assert i >= 0, f"no configuration for {gpu}"
    assert t[i]["variant"] == variant and smem == t[i]["smem"] <= optin
    # Nothing preferred (earlier in the table, bigger tile or more stages) of this variant would fit.
    for j in range(i):
        if t[j]["variant"] == variant:
            assert t[j]["smem"] > optin


def test_choice_per_device(plan_bin):
    """The configurations each GPU class gets (the table in docs/cuda.md)."""
    got = {gpu: [int(run(plan_bin, "choose", v, optin).split()[0]) for v in (F32, TF32, F64)]
           for gpu, optin in OPTIN.items()}
    assert got == {"H100/H200 (sm_90)": [0, 2, 5], "A100 (sm_80)": [0, 3, 5],
                   "RTX 30xx/40xx, L4, L40, A10 (sm_86/89)": [1, 4, 5]}
    t = table(plan_bin)
    assert t[got["A100 (sm_80)"][0]]["bm"] == t[got["A100 (sm_80)"][1]]["bm"] == 128   # 128 x 128 tiles on the A100
    # Below every configuration: -1 (the op then raises an error naming the device).
    assert run(plan_bin, "choose", F32, 32 * KIB).split()[0] == "-1"


@pytest.mark.parametrize("sym", [0, 1])
@pytest.mark.parametrize("bm", [64, 128])
def test_tile_map_exhaustive_small(plan_bin, sym, bm):
    for n1 in list(range(1, 40 * bm, 7 * bm + 13)) + [bm, 8 * bm, 8 * bm + 1, 17 * bm - 1]:
        for n2 in ([n1] if sym else [1, bm + 1, 9 * bm, 23 * bm + 5]):
            served, _ = map(int, run(plan_bin, "tiles", n1, n2, sym, bm).split())
            t1, t2 = -(-n1 // bm), -(-n2 // bm)
            assert served == (t1 * (t1 + 1) // 2 if sym else t1 * t2)


@pytest.mark.parametrize("n", [100_003, 3_000_001])
def test_tile_map_large(plan_bin, n):
    """n = 100k: exhaustive (every upper tile once); n = 3M: sampled super tiles (the sqrt inversion)."""
    out = run(plan_bin, "tiles", n, n, 1, 64)
    served, blocks = map(int, out.split())
    assert blocks < 2 ** 31 and served > 0


def test_chunk_walk(plan_bin):
    assert run(plan_bin, "chunks", 7) == "ok"


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_pipeline_schedule(plan_bin, stages):
    for total in (1, 2, 3, 5, 17):
        assert run(plan_bin, "pipeline", stages, total) == "ok"
