import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not `"cuda" in item.keywords`: keywords also hold the names of parent nodes, so a
        # checkout in a directory named "cuda" would skip every test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh, randomly seeded generator (the seed is printed on failure)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


# Op tests take a `device` parameter: the CPU always, CUDA when present (skipped otherwise, so the
# CUDA cases stay visible in the report).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
