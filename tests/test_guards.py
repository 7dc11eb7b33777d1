"""Issue 18: bad input and faults.  Memory guard, Gram checks, divergence, unsolved regressions, loaders, CLI."""
import gzip
import math

import numpy as np
import pytest
import torch

from ntk_fast import FCNet, empirical_ntk, kernel_flow, kernel_regression, mse_flow, train
from ntk_fast import data
from ntk_fast.cli import main as cli_main
from ntk_fast.guards import (DEFAULT_MAX_STEPS, DivergenceMonitor, MemoryBudgetError, available_bytes, check_gram,
                             fmt_bytes, lanczos_extremes, require_memory)
from ntk_fast.guards import memory as gmem
from ntk_fast.guards.memory import parse_bytes
from ntk_fast.guards.psd import check_ntk_result

D = torch.float64


def labels(n, gen):
    y = torch.randint(0, 2, (n,), generator=gen).to(D) * 2 - 1
    return y


def psd_from_features(n, p, gen, dtype=D):
    A = torch.randn(n, p, generator=gen, dtype=D)
    return (A @ A.t() / p).to(dtype)


# ------------------------------------------------------------------------------------------------ memory
def test_parse_and_format_bytes():
    assert parse_bytes("3G") == 3 * 2 ** 30 and parse_bytes("512M") == 512 * 2 ** 20
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes("123") == 123 and parse_bytes("off") == math.inf
    with pytest.raises(ValueError, match="NTK_FAST_MEMORY_LIMIT"):
        parse_bytes("lots")
    assert fmt_bytes(3 * 2 ** 30) == "3 GiB" and fmt_bytes(16e12).endswith("TiB") and fmt_bytes(100) == "100 B"


def test_available_bytes_host_and_override(monkeypatch):
    monkeypatch.delenv(gmem.ENV, raising=False)
    host = available_bytes("cpu")
    assert 0 < host
    with open("/proc/meminfo") as fh:
        total = int(next(l for l in fh if l.startswith("MemTotal:")).split()[1]) * 1024
    assert host <= total
    monkeypatch.setenv(gmem.ENV, "3G")
    assert available_bytes("cpu") == 3 * 2 ** 30
    with pytest.raises(MemoryBudgetError, match=r"needs about 4 GiB but only 3 GiB.*try smaller"):
        require_memory(4 * 2 ** 30, "thing", "cpu", "try smaller")
    require_memory(2 * 2 ** 30, "thing", "cpu")


def test_cgroup_limit_is_used(monkeypatch):
    monkeypatch.delenv(gmem.ENV, raising=False)
    vals = {"/sys/fs/cgroup/memory.max": 5 << 20, "/sys/fs/cgroup/memory.current": 1 << 20}
    monkeypatch.setattr(gmem, "_read_int", lambda p: vals.get(p))
    assert available_bytes("cpu") == 4 << 20          # min(MemAvailable, limit - usage)
    vals["/sys/fs/cgroup/memory.max"] = None          # "max": no limit -> MemAvailable
    assert available_bytes("cpu") > 4 << 20


def test_empirical_ntk_memory_guard_and_memmap_way_out(tmp_path, monkeypatch, gen):
    net = FCNet(7, 16, 2, dtype=D, generator=gen)
    # the call: 2e6 points, no out -> a clear error before any allocation (no override needed)
    monkeypatch.delenv(gmem.ENV, raising=False)
    with pytest.raises(MemoryBudgetError, match=r"\(2000000, 2000000\).*TiB.*out=.*block_size.*distributed"):
        empirical_ntk(FCNet(10, 8, 1), torch.randn(2_000_000, 10))
    x = torch.randn(301, 7, generator=gen, dtype=D)
    ref = empirical_ntk(net, x)
    monkeypatch.setenv(gmem.ENV, "400K")              # the 301 x 301 float64 result needs 708 KiB
    with pytest.raises(MemoryBudgetError, match="empirical_ntk"):
        empirical_ntk(net, x)
    mm = np.lib.format.open_memmap(str(tmp_path / "gram.npy"), mode="w+", dtype=np.float64, shape=(301, 301))
    out = empirical_ntk(net, x, out=torch.from_numpy(mm), block_size=64)
    mm.flush()
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "gram.npy")), ref)
    assert out.data_ptr() == torch.from_numpy(mm).data_ptr()


def test_train_and_solver_memory_guards(monkeypatch, gen):
    monkeypatch.setenv(gmem.ENV, "10K")
    x = torch.randn(40, 5, generator=gen, dtype=D)
    y = labels(40, gen)
    with pytest.raises(MemoryBudgetError, match="train: the buffers"):
        train(FCNet(5, 64, 2, dtype=D, generator=gen), x, y, 1.0, progress=False)
    K = psd_from_features(40, 50, gen)
    with pytest.raises(MemoryBudgetError, match="kernel_regression"):
        kernel_regression(K, y)
    with pytest.raises(MemoryBudgetError, match="kernel_flow"):
        kernel_flow(K, y, packed=True, progress=False)


# ------------------------------------------------------------------------------------------------ Gram checks
@pytest.mark.parametrize("n", [1, 2, 17, 60])
def test_lanczos_extremes_bracket_the_spectrum(n, gen):
    A = torch.randn(n, n, generator=gen, dtype=D)
    S = (A + A.t()) / 2
    ev = torch.linalg.eigvalsh(S)
    lo, hi = lanczos_extremes(S, iters=n, seed=3)       # iters >= n: exact
    assert abs(lo - ev[0]) < 1e-8 * ev.abs().max() and abs(hi - ev[-1]) < 1e-8 * ev.abs().max()
    lo, hi = lanczos_extremes(S, iters=min(n, 8), seed=3)   # few iterations: Ritz values inside the spectrum
    assert ev[0] - 1e-10 <= lo <= hi <= ev[-1] + 1e-10


def test_lanczos_on_memmap(tmp_path, gen):
    K = psd_from_features(53, 5, gen) - 0.3 * torch.eye(53, dtype=D)
    mm = np.lib.format.open_memmap(str(tmp_path / "k.npy"), mode="w+", dtype=np.float64, shape=(53, 53))
    mm[:] = K.numpy()
    mm.flush()
    lo, hi = lanczos_extremes(np.load(tmp_path / "k.npy", mmap_mode="r"), iters=53)
    ev = torch.linalg.eigvalsh(K)
    assert abs(lo - ev[0]) < 1e-9 and abs(hi - ev[-1]) < 1e-9


def test_check_gram_passes_singular_and_float32_rounding(gen):
    K = psd_from_features(80, 7, gen)                   # rank 7: singular PSD
    assert torch.linalg.eigvalsh(K)[0] < 1e-12
    check_gram(K, "K")
    K32 = psd_from_features(120, 3, gen, torch.float32)  # float32 Gram with rounding-level negative eigenvalues
    ev = torch.linalg.eigvalsh(K32.double())
    assert ev[0] < 0                                     # rounding makes some slightly negative
    check_gram(K32, "K")
    check_gram(torch.zeros(5, 5, dtype=D), "K")         # the zero kernel is a (trivial) Gram matrix


def test_check_gram_rejects_indefinite_and_negative_diagonal(gen):
    n = 31
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    lam = torch.rand(n, generator=gen, dtype=D) + 0.5
    lam[0] = -0.05                                       # one negative eigenvalue, 10% of the largest
    K = Q @ torch.diag(lam) @ Q.t()
    K = (K + K.t()) / 2
    assert (K.diagonal() > 0).all()                      # the diagonal alone does not tell
    with pytest.raises(ValueError, match="K_train is not positive semi-definite"):
        check_gram(K, "K_train")
    with pytest.raises(ValueError, match=r"K\[1\] is not positive semi-definite"):
        check_gram(torch.stack([psd_from_features(n, 40, gen), K]), "K")
    with pytest.raises(ValueError, match=r"negative diagonal entry K_train\[0, 0\]"):
        check_gram(-torch.eye(20, dtype=D), "K_train")
    with pytest.raises(ValueError, match="NaN"):
        check_gram(torch.full((3, 3), float("nan"), dtype=D), "K")


def test_empirical_ntk_opt_in_check(gen):
    net = FCNet(4, 12, 2, k=3, dtype=D, generator=gen)
    x = torch.randn(9, 4, generator=gen, dtype=D)
    for mode in ("full", "trace", "diagonal"):
        empirical_ntk(net, x, mode=mode, check=True)
    empirical_ntk(net, x, x[:4], check=True)
    bad = torch.randn(5, 5, dtype=D)
    with pytest.raises(ValueError, match="not symmetric"):
        check_ntk_result(bad, True, "trace")
    with pytest.raises(ValueError, match="negative diagonal"):
        check_ntk_result(-torch.eye(5, dtype=D), True, "trace")


# ------------------------------------------------------------------------------------------------ dynamics
def test_divergence_monitor():
    m = DivergenceMonitor(window=5)
    assert not any(m.update(v) for v in [5, 4, 3, 2, 1, 1, 1, 1, 1, 1])   # decreasing, then flat: fine
    m = DivergenceMonitor(window=5)
    flags = [m.update(1 + 0.1 * i) for i in range(6)]
    assert flags == [False] * 4 + [True, True]
    m = DivergenceMonitor(window=5)
    assert not any(m.update(v) for v in [1, 2, 1, 2, 1, 2, 1, 2])          # oscillating: not steady growth


def test_kernel_flow_non_gram_kernels_end(gen):
    n = 20
    y = labels(n, gen)
    with pytest.raises(ValueError, match="K_train has a negative diagonal"):
        kernel_flow(-torch.eye(n, dtype=D), y, progress=False)
    res = kernel_flow(-torch.eye(n, dtype=D), y, validate=False, progress=False)
    assert res.status == "diverging" and res.statuses == ["diverging"] and int(res.steps[0]) <= 100
    # two problems: a PSD one converges, the negative one is flagged; overall status "diverging"
    K = torch.stack([psd_from_features(n, 60, gen) + 0.1 * torch.eye(n, dtype=D), -torch.eye(n, dtype=D)])
    res = kernel_flow(K, y, validate=False, progress=False)
    assert res.statuses == ["converged", "diverging"] and res.status == "diverging"
    with pytest.raises(ValueError, match=r"K_train\[1\] has a negative diagonal"):
        kernel_flow(K, y, progress=False)


def test_default_step_budgets(monkeypatch, gen):
    from ntk_fast.dynamics import solver, trainer
    n = 15
    y = labels(n, gen)
    K = psd_from_features(n, 30, gen)
    res = kernel_flow(K, y, loss="mse", progress=False, max_time=1e-3)
    assert res.config["max_steps"] == DEFAULT_MAX_STEPS
    monkeypatch.setattr(solver, "DEFAULT_MAX_STEPS", 40)   # the mse flow has no margin stop
    res = kernel_flow(K, y, loss="mse", progress=False)
    assert res.status == "max_steps" and int(res.steps[0]) == 40
    monkeypatch.setattr(trainer, "DEFAULT_MAX_STEPS", 7)
    x = torch.randn(n, 3, generator=gen, dtype=D)
    r = train(FCNet(3, 16, 1, dtype=D, generator=gen), x, y, 1e-3, progress=False, kernel_points=0)
    assert r.status == "max_steps" and r.final[0]["step"] == 7


def test_kernel_regression_unsolved_is_not_a_fit(gen):
    n = 20
    y = labels(n, gen)
    with pytest.warns(RuntimeWarning, match="jitter"), pytest.raises(ValueError, match="not solved.*residual"):
        kernel_regression(torch.ones(n, n, dtype=D), y)
    with pytest.warns(RuntimeWarning, match="jitter"):
        r = kernel_regression(torch.ones(n, n, dtype=D), y, on_unsolved="status")
    assert r.status == "unsolved" and r.residual > 0.1 and r.jitter > 0
    with pytest.raises(ValueError, match="on_unsolved"):
        kernel_regression(torch.eye(3, dtype=D), y[:3], on_unsolved="ignore")
    # a smooth (badly conditioned) kernel is still solved: the verdict is on the residual, not on the condition
    x = torch.rand(40, 1, generator=gen, dtype=D)
    Krbf = torch.exp(-torch.cdist(x, x) ** 2 / 2)
    yy = torch.sin(3 * x[:, 0])
    r = kernel_regression(Krbf, yy, ridge=1e-8)
    assert r.status == "solved" and r.residual < 1e-3 and r.condition > 1e6
    # a well-posed one agrees with a dense solve
    K = psd_from_features(n, 60, gen)
    r = kernel_regression(K, y, ridge=0.1)
    torch.testing.assert_close(r.coef, torch.linalg.solve(K + 0.1 * torch.eye(n, dtype=D), y))
    assert r.residual < 1e-10 and r.jitter == 0.0


def test_mse_flow_rejects_indefinite(gen):
    with pytest.raises(ValueError, match="negative diagonal"):
        mse_flow(-torch.eye(6, dtype=D), labels(6, gen))


# ------------------------------------------------------------------------------------------------ loaders, CLI
def test_corrupt_data_files_name_the_file(tmp_path):
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    blob = gzip.compress(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") * 3 + bytes(8))
    gz.write_bytes(blob[: len(blob) // 2])                        # truncated download
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        data.read_idx(str(gz))
    folder = tmp_path / "cifar"
    folder.mkdir()
    for f in data.CIFAR_FILES:
        (folder / f).write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_1: corrupt"):
        data.load_cifar_batches(str(folder))
    with pytest.raises(data.DatasetNotFound, match="does not exist: .*nowhere"):
        data.load_dataset("fashion", p=10, root=str(tmp_path / "nowhere"))


def test_cli_bad_args_exit_with_a_message(tmp_path, capsys):
    assert cli_main(["kernel", "--max-steps", "-1", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "--max-steps must be >= 0" in capsys.readouterr().err
    assert cli_main(["gram", "--p", "10", "--to-disk", "--tile", "0", "--out", str(tmp_path / "g")]) == 2
    assert "--tile must be >= 1" in capsys.readouterr().err
    assert cli_main(["kernel", "--pg-timeout", "-1", "--out", str(tmp_path / "k")]) == 2
    assert "--pg-timeout must be a positive" in capsys.readouterr().err
    assert cli_main(["train", "--device", "nodevice", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "--device 'nodevice' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["train", "--device", "cuda", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
        assert "no usable CUDA device" in capsys.readouterr().err
    assert cli_main(["train", "--dataset", "fashion", "--data", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "d"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_available_bytes_and_guard(monkeypatch):
    monkeypatch.delenv(gmem.ENV, raising=False)
    free, total = torch.cuda.mem_get_info()
    avail = available_bytes("cuda")
    assert free <= avail <= total
    net = FCNet(10, 8, 1, device="cuda")
    with pytest.raises(MemoryBudgetError, match=r"available on cuda"):
        empirical_ntk(net, torch.zeros(2_000_000, 10, device="cuda"))


def test_structured_full_mode_estimate_counts_features_and_result_only():
    """mode="full" (k > 1) of a structured model: the gram_full op writes the result directly, so the estimate
    is the features plus the result (none with out=), plus one row panel when out is on another device."""
    from torch import nn
    from ntk_fast.guards.estimates import empirical_ntk_bytes
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    n, k, e = 1000, 3, 4
    width = (5 + 1 + k * 8) + (8 + 1 + k * 3)
    assert empirical_ntk_bytes(net, n, None, k, "full", True, None, False, e) == e * (n * width + n * n * k * k)
    assert empirical_ntk_bytes(net, n, None, k, "full", True, None, True, e) == e * n * width
    assert empirical_ntk_bytes(net, n, None, k, "full", True, 100, True, e, out_elsewhere=True) == \
        e * (n * width + 100 * n * k * k)
    assert empirical_ntk_bytes(net, n, None, k, "full", True, None, True, e, out_elsewhere=True) == \
        e * (n * width + 125 * n * k * k)
