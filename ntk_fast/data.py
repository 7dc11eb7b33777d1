"""Datasets and the paper's preprocessing (first version: Fashion-MNIST from the standard idx files).

Preprocessing (as in the paper's code, applied to train and test merged):
  1. pixels / 255, images flattened to d = 784;
  2. each class shuffled with a torch.Generator seeded by ``seed``; classes interleaved round-robin
     (class 0, 1, ..., 9, 0, 1, ...), every class truncated to the smallest class size;
  3. x <- x - mean over all points (per pixel), then each x rescaled to norm sqrt(d);
  4. y = +1 for odd class ids, -1 for even ones;
  5. the first p points are the training set, the rest the test set (optionally truncated to p_test).

Fashion-MNIST is found in, in order: the ``root`` argument, ``$NTK_FAST_FASHION_MNIST``, and
``/usr/share/datasets/fashion-mnist`` (Debian's package ``dataset-fashion-mnist``).  Any folder that holds
the four standard files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, optionally ``.gz``) works.  Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import math
import os
from typing import Optional, Tuple

import numpy as np
import torch

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFound(FileNotFoundError):
    """Raised with instructions on how to get the data."""


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array, checking its header."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated idx data ({len(raw) - header} bytes for shape {shape})")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _find_file(folder: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p
    return None


def find_idx_folder(root: Optional[str] = None, env: str = "NTK_FAST_FASHION_MNIST",
                    defaults=FASHION_DIRS, name: str = "Fashion-MNIST",
                    how: str = "install Debian's package with `apt-get install dataset-fashion-mnist`") -> str:
    """First folder (root, $env, defaults) holding the four standard idx files, else DatasetNotFound."""
    candidates = [c for c in (root, os.environ.get(env)) if c] + list(defaults)
    for c in candidates:
        if all(_find_file(c, stem) for stem in IDX_FILES.values()):
            return c
    raise DatasetNotFound(
        f"{name} not found (looked in: {', '.join(candidates)}). To get it, {how}, or pass a folder holding "
        f"the four standard idx files ({', '.join(IDX_FILES.values())}, optionally .gz) as root= or in ${env}.")


def load_idx_dataset(folder: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) of train and test merged (train first)."""
    parts = {k: read_idx(_find_file(folder, stem)) for k, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        if parts[f"{split}_images"].shape[0] != parts[f"{split}_labels"].shape[0]:
            raise ValueError(f"{folder}: {split} images and labels have different counts")
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    return images, labels


def balance_and_interleave(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices: each class shuffled (torch.Generator seeded by ``seed``), truncated to the smallest class,
    interleaved round-robin over the sorted class ids."""
    classes = np.unique(labels)
    g = torch.Generator().manual_seed(int(seed))
    per_class = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        perm = torch.randperm(len(idx), generator=g).numpy()
        per_class.append(idx[perm])
    m = min(len(p) for p in per_class)
    return np.stack([p[:m] for p in per_class], axis=1).reshape(-1)


def center_and_normalise(x: torch.Tensor) -> torch.Tensor:
    """x - mean over points, then each row rescaled to norm sqrt(d)."""
    x = x - x.mean(dim=0, keepdim=True)
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("center_and_normalise: a point equals the mean and cannot be normalised")
    return x * (math.sqrt(x.shape[1]) / norms)


def parity_labels(classes: torch.Tensor) -> torch.Tensor:
    """+1 for odd class ids, -1 for even ones."""
    return (2 * (classes % 2) - 1).to(torch.float64)


def preprocess(images: np.ndarray, labels: np.ndarray, seed: int = 0, dtype: torch.dtype = torch.float64
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's preprocessing of a merged dataset: (x (N, d), y (N,) in {-1, +1}, class ids (N,))."""
    order = balance_and_interleave(labels, seed)
    x = torch.from_numpy(images[order].reshape(len(order), -1).astype(np.float64) / 255.0)
    x = center_and_normalise(x)
    classes = torch.from_numpy(labels[order])
    return x.to(dtype), parity_labels(classes).to(dtype), classes


def binary_dataset(name: str = "fashion", p: int = 10000, p_test: Optional[int] = None, seed: int = 0,
                   root: Optional[str] = None, dtype: torch.dtype = torch.float64
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (p, d), y_train (p,), x_test, y_test) of the paper's binary task on a dataset.

    The first p preprocessed points train, the rest (up to p_test of them) test.
    """
    if name != "fashion":
        raise ValueError(f"binary_dataset: unknown dataset {name!r} (this version knows 'fashion')")
    folder = find_idx_folder(root)
    images, labels = load_idx_dataset(folder)
    x, y, _ = preprocess(images, labels, seed, dtype)
    if not 0 < p < x.shape[0]:
        raise ValueError(f"binary_dataset: p must be in [1, {x.shape[0] - 1}], got {p}")
    x_te, y_te = x[p:], y[p:]
    if p_test is not None:
        x_te, y_te = x_te[:p_test], y_te[:p_test]
    return x[:p].contiguous(), y[:p].contiguous(), x_te.contiguous(), y_te.contiguous()
