"""Fashion-MNIST loading and the paper's preprocessing, on small idx files written by the test."""
import gzip
import math
import os

import numpy as np
import pytest
import torch

from ntk_fast import data


def write_idx(path, arr, gz):
    arr = np.asarray(arr)
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
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
