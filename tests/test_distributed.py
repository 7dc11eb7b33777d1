"""Issue 16: the on-disk Gram across torch.distributed ranks (ntk_fast.distributed): equal to the in-memory
empirical_ntk, exactly symmetric, resumable after SIGKILL without recomputing finished tiles, and refusing
other weights/data or corrupt manifests with errors naming the file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ntk_fast import FCNet, empirical_ntk
from ntk_fast.distributed import gram as dgram
from ntk_fast.distributed import gram_to_disk, layout, manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOW_RUN = r'''
def flow_run(step, theta, n):
    """Three attempts of the kernel flow for 2 problems (one inactive at the last attempt) from a seeded state."""
    import torch
    gen = torch.Generator().manual_seed(3)
    y = torch.where(torch.randn(2, n, generator=gen) > 0, 1.0, -1.0).double()
    f = 0.1 * torch.randn(2, n, generator=gen, dtype=torch.float64)
    g = 0.01 * torch.randn(2, n, generator=gen, dtype=torch.float64)
    r, c = torch.zeros_like(f), torch.zeros_like(f)
    dt = torch.tensor([0.5, 2.0], dtype=torch.float64)
    stats = []
    for i in range(3):
        active = torch.tensor([True, i < 2])
        f, r, g, c, st = step(theta, y, f, g, r, c, dt, active, "softhinge", 20.0)
        stats.append(st)
    return f, r, g, c, torch.stack(stats)
'''

WORKER = FLOW_RUN + r'''
import datetime, os, signal, sys
import torch
torch.set_num_threads(1)
from ntk_fast import FCNet
import ntk_fast.distributed.gram as G

N, K, MODE, TILE = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
WORLD, KILL_AFTER, PAGE, RANK = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    net = FCNet(5, 16, 2, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return net, x


def run(rank, path):
    if WORLD > 1:
        torch.distributed.init_process_group("gloo", init_method="file://" + path + ".pg", rank=rank,
                                             world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    if KILL_AFTER >= 0 and rank == WORLD - 1:
        orig, count = G.compute_tile, [0]
        def killer(*a, **kw):
            if count[0] == KILL_AFTER:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return orig(*a, **kw)
        G.compute_tile = killer
    net, x = problem()
    G.gram_to_disk(net, x, path, mode=MODE, tile=TILE, page_bytes=PAGE, progress=False)
    if os.environ.get("NTK_TEST_X2"):           # row panels of x1 against x2, in the same process group
        x2 = torch.randn(64, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        G.gram_to_disk(net, x, path + ".x2.npy", x2, mode=MODE, tile=TILE, page_bytes=PAGE, progress=False)
        from ntk_fast.distributed.flow import RowShard, sharded_flow_step
        torch.save(flow_run(sharded_flow_step, RowShard.from_file(path), N), path + f".flow{rank}.pt")
    if WORLD > 1:
        torch.distributed.destroy_process_group()


run(RANK, sys.argv[1])
'''


def _problem(n, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return FCNet(5, 16, 2, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), x


def _worker(tmp_path, path, n, k, mode, tile, world, kill_after=-1, page=4096, timeout=120, x2=False):
    """Start ``world`` worker processes (ranks of a gloo group through a file store); returns the list of
    (return code, stderr) once all have ended (each bounded by ``timeout`` seconds)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    if os.path.exists(str(path) + ".pg"):
        os.remove(str(path) + ".pg")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               NTK_TEST_X2="1" if x2 else "")
    args = [sys.executable, str(script), str(path), str(n), str(k), mode, str(tile), str(world), str(kill_after),
            str(page)]
    procs = [subprocess.Popen(args + [str(r)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(world)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err.decode()[-3000:]))
    return out


def _done_lists(path):
    lists = []
    for r in range(4):
        p = manifest.done_path(str(path), r)
        if os.path.exists(p):
            lists.append([tuple(t) for t in json.load(open(p))["tiles"]])
    return lists


@pytest.mark.parametrize("k,mode,with_x2", [(1, "full", False), (3, "full", False), (3, "trace", False),
                                            (2, "diagonal", False), (3, "full", True), (1, "trace", True)])
def test_one_process_equals_reference(tmp_path, gen, k, mode, with_x2):
    n = 37                                            # odd, 5 row blocks of 8 (page_bytes=8: no rounding)
    net = FCNet(5, 13, 2, k, dtype=torch.float64, generator=gen)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(11, 5, generator=gen, dtype=torch.float64) if with_x2 else None
    ref = empirical_ntk(net, x, x2, mode=mode)
    g0 = gram_to_disk(net, x, tmp_path / "g0.npy", x2, mode=mode, tile=8, page_bytes=8, progress=False,
                      cache_features=False)           # one public empirical_ntk call per tile
    torch.testing.assert_close(g0, ref, rtol=1e-12, atol=1e-12)
    g = gram_to_disk(net, x, tmp_path / "g.npy", x2, mode=mode, tile=8, page_bytes=8, progress=False)
    assert g.shape == ref.shape
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
    if mode != "diagonal" and not with_x2:
        sw = g.transpose(0, 1).transpose(2, 3) if g.dim() == 4 else g.T
        assert torch.equal(g, sw)                     # mirrored, so exactly symmetric
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), g.numpy())   # a plain .npy to numpy


def test_dispatch_from_empirical_ntk_and_jacobian_models(tmp_path, gen):
    """out=PATH routes to the on-disk Gram; a model only the jacobian path supports works tile by tile."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 7).double()
            self.b = nn.Linear(7, 2).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) * x.sum(1, keepdim=True))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = Odd()
    x = torch.randn(23, 4, generator=gen, dtype=torch.float64)
    g = empirical_ntk(net, x, out=str(tmp_path / "j.npy"), block_size=2048)   # rounded: one tile
    torch.testing.assert_close(g, empirical_ntk(net, x), rtol=1e-12, atol=1e-12)
    g = gram_to_disk(net, x, tmp_path / "j2.npy", mode="trace", tile=5, page_bytes=8, progress=False)
    torch.testing.assert_close(g, empirical_ntk(net, x, mode="trace"), rtol=1e-12, atol=1e-12)


def test_layout_pages_and_balance():
    """Row blocks start on page boundaries in the file; LPT spreads the upper-triangle work evenly."""
    for n, itemsize, k2 in [(299, 8, 1), (296, 8, 1), (1000, 4, 9)]:
        row_bytes = n * itemsize * k2
        q = layout.row_quantum(row_bytes, 4096)
        for r0, _ in layout.block_bounds(n, 50, q):
            assert (layout.HEADER_BYTES + r0 * row_bytes) % 4096 == 0
    rows = layout.block_bounds(4000, 100, 1)
    tiles = layout.all_tiles(len(rows), len(rows), True)
    plan = layout.plan_tiles(tiles, rows, rows, True, 3)
    assert sorted(t for p in plan.values() for t in p) == sorted(tiles)
    loads = [sum(layout.tile_cost(rows, rows, t, True) for t in plan[r]) for r in range(3)]
    assert max(loads) / min(loads) < 1.1
    owners = {t[0]: r for r in plan for t in plan[r]}         # every row block has exactly one writer
    assert all(owners[t[0]] == r for r in plan for t in plan[r])


def test_two_ranks_gloo(tmp_path):
    """2 ranks (gloo): the same array as one process, each rank did part of the tiles, none twice; with x2,
    row panels across the ranks."""
    n, k = 296, 1                                      # float64 rows of 2368 bytes: blocks of 64 rows are whole pages
    path = tmp_path / "g2.npy"
    res = _worker(tmp_path, path, n, k, "trace", 64, 2, x2=True)
    assert all(rc == 0 for rc, _ in res), res
    net, x = _problem(n, k)
    g = np.load(path)
    np.testing.assert_allclose(g, empirical_ntk(net, x, mode="trace").numpy(), rtol=1e-12, atol=1e-12)
    assert np.array_equal(g, g.T)
    lists = _done_lists(path)
    assert len(lists) == 2 and all(lists)
    flat = [t for lst in lists for t in lst]
    assert len(flat) == len(set(flat)) == 15           # 5 row blocks: 15 upper tiles, each computed once
    x2 = torch.randn(64, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    np.testing.assert_allclose(np.load(str(path) + ".x2.npy"), empirical_ntk(net, x, x2, mode="trace").numpy(),
                               rtol=1e-12, atol=1e-12)
    lists = _done_lists(str(path) + ".x2.npy")         # 64 columns: rows of 512 bytes, 5 row panels of 64
    assert len(lists) == 2 and all(lists)
    assert sorted(t for lst in lists for t in lst) == [(i, 0) for i in range(5)]
    # kernel flow attempts on Theta split by rows (ntk_fast.distributed.flow): the same on both ranks, bit for
    # bit, and equal to the op's reference on the whole Theta
    ns = {}
    exec(FLOW_RUN, ns)
    from ntk_fast.ops.reference import kernel_flow_step_ref
    want = ns["flow_run"](kernel_flow_step_ref, torch.from_numpy(g), n)
    got = [torch.load(str(path) + f".flow{r}.pt") for r in range(2)]
    for a, b, w in zip(got[0], got[1], want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-15)


def test_sigkill_then_resume_computes_only_missing_tiles(tmp_path, monkeypatch):
    """One process SIGKILLed after 4 tiles; the rerun computes exactly the other tiles, result equals the
    reference (also resumed with another world size: 1 here, after a 1-rank run)."""
    n, k = 45, 2
    path = tmp_path / "k.npy"
    script_tile = 8
    res = _worker(tmp_path, path, n, k, "full", script_tile, 1, kill_after=4, page=8)
    assert res[0][0] == -9                             # SIGKILL
    net, x = _problem(n, k)
    before = {t for lst in _done_lists(path) for t in lst}
    assert len(before) == 4
    calls = []
    orig = dgram.compute_tile
    monkeypatch.setattr(dgram, "compute_tile", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    g = gram_to_disk(net, x, path, mode="full", tile=script_tile, page_bytes=8, progress=False)
    rows = layout.block_bounds(n, json.load(open(manifest.manifest_path(str(path))))["tile"], 1)
    total = len(layout.all_tiles(len(rows), len(rows), True))
    assert len(calls) == total - 4
    torch.testing.assert_close(g, empirical_ntk(net, x), rtol=1e-12, atol=1e-12)


def test_sigkill_one_rank_of_two_then_resume(tmp_path):
    """Rank 1 SIGKILLs itself after 2 tiles; rank 0 fails instead of hanging; the rerun on 2 ranks finishes
    with no tile listed twice (none recomputed) and the reference result."""
    n, k = 296, 1
    path = tmp_path / "k2.npy"
    res = _worker(tmp_path, path, n, k, "trace", 64, 2, kill_after=2)
    assert res[1][0] == -9 and res[0][0] != 0, res     # rank 1 killed, rank 0 failed (did not hang)
    before = [t for lst in _done_lists(path) for t in lst]
    assert 2 <= len(before) < 15
    res = _worker(tmp_path, path, n, k, "trace", 64, 2)
    assert all(rc == 0 for rc, _ in res), res
    flat = [t for lst in _done_lists(path) for t in lst]
    assert len(flat) == len(set(flat)) == 15 and set(before) <= set(flat)
    net, x = _problem(n, k)
    np.testing.assert_allclose(np.load(path), empirical_ntk(net, x, mode="trace").numpy(), rtol=1e-12, atol=1e-12)


def test_row_shard_one_process_equals_reference(tmp_path, gen):
    """Without a process group the shard is the whole Theta: attempts equal kernel_flow_step's reference."""
    from ntk_fast.distributed.flow import RowShard, row_range, sharded_flow_step
    from ntk_fast.ops.reference import kernel_flow_step_ref
    net = FCNet(5, 9, 2, 1, dtype=torch.float64, generator=gen)
    x = torch.randn(31, 5, generator=gen, dtype=torch.float64)
    theta = gram_to_disk(net, x, tmp_path / "t.npy", tile=8, page_bytes=8, progress=False)
    ns = {}
    exec(FLOW_RUN, ns)
    got = ns["flow_run"](sharded_flow_step, RowShard.from_file(tmp_path / "t.npy"), 31)
    want = ns["flow_run"](kernel_flow_step_ref, theta.clone(), 31)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-15)
    assert [row_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_refuses_other_weights_data_or_tiling(tmp_path, gen):
    net = FCNet(5, 9, 2, 1, dtype=torch.float64, generator=gen)
    x = torch.randn(21, 5, generator=gen, dtype=torch.float64)
    path = tmp_path / "m.npy"
    gram_to_disk(net, x, path, tile=8, page_bytes=8, progress=False)
    mpath = manifest.manifest_path(str(path))
    with pytest.raises(ValueError, match="x1_digest") as e:
        gram_to_disk(net, x + 1e-9, path, tile=8, page_bytes=8, progress=False)
    assert mpath in str(e.value)
    with torch.no_grad():
        next(net.parameters())[0, 0] += 1e-9
    with pytest.raises(ValueError, match="model_digest") as e:
        gram_to_disk(net, x, path, tile=8, page_bytes=8, progress=False)
    assert mpath in str(e.value)
    with pytest.raises(ValueError, match="tile"):
        gram_to_disk(net, x, path, tile=4, page_bytes=8, progress=False)
    other = tmp_path / "plain.npy"
    np.save(other, np.zeros((21, 21)))
    with pytest.raises(ValueError, match="without a manifest"):
        gram_to_disk(net, x, other, progress=False)
    with pytest.raises(ValueError, match=r"\.npy"):
        gram_to_disk(net, x, tmp_path / "g.bin", progress=False)
    with pytest.raises(ValueError, match="the folder of out does not exist"):
        gram_to_disk(net, x, tmp_path / "missing" / "g.npy", progress=False)


def test_corrupt_manifest_done_list_or_array_are_errors(tmp_path, gen):
    net = FCNet(5, 9, 2, 1, dtype=torch.float64, generator=gen)
    x = torch.randn(19, 5, generator=gen, dtype=torch.float64)
    path = str(tmp_path / "c.npy")
    ref = gram_to_disk(net, x, path, tile=8, page_bytes=8, progress=False).clone()
    mpath, dpath = manifest.manifest_path(path), manifest.done_path(path, 0)
    good_m, good_d = open(mpath).read(), open(dpath).read()
    for target, text in [(mpath, good_m[: len(good_m) // 2]), (mpath, "garbage"), (dpath, good_d[:10]),
                         (dpath, json.dumps({"format": "x"}))]:
        open(target, "w").write(text)
        with pytest.raises(ValueError) as e:
            gram_to_disk(net, x, path, tile=8, page_bytes=8, progress=False)
        assert target in str(e.value)
        open(mpath, "w").write(good_m)
        open(dpath, "w").write(good_d)
    with open(path, "r+b") as fh:                     # truncated array
        fh.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match="truncated") as e:
        gram_to_disk(net, x, path, tile=8, page_bytes=8, progress=False)
    assert path in str(e.value)
    os.remove(path)                                    # array gone but tiles listed: refused, not recomputed
    with pytest.raises(ValueError, match="missing"):
        gram_to_disk(net, x, path, tile=8, page_bytes=8, progress=False)
    assert ref.shape == (19, 19)
