"""pytest-benchmark suites of ntk_fast: ``pytest bench/`` (``--benchmark-disable`` runs each case once).

The suites are the files ``bench/bench_*.py`` that define ``test_`` functions; they are collected by the hook
below (pytest's default pattern is test_*.py, so ``pytest tests`` never sees them).  Plain scripts in bench/
(bench_flow.py, gram_cpu.py, ...) have no test functions and are not collected.
Cases marked ``cuda`` are skipped without a GPU.  Without pytest-benchmark installed a stand-in ``benchmark``
fixture calls each function once (no statistics).
"""
from __future__ import annotations

import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collect_file(file_path, parent):
    name = file_path.name
    if file_path.suffix == ".py" and name.startswith("bench_") and str(file_path.parent) == HERE:
        try:
            text = file_path.read_text()
        except OSError:
            return None
        if "def test_" in text:
            return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and str(item.path).startswith(HERE):
            item.add_marker(skip)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # pragma: no cover - stand-in when the plugin is missing
    class _Once:
        def __init__(self):
            self.extra_info = {}
            self.group = None

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, fn, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
            if setup is not None:
                args, kwargs = setup()
            return fn(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _Once()
