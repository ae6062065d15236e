"""Shared fixtures: the real data in ``MONAI_DATA_DIRECTORY`` (``../shared/data`` by default)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("MONAI_DATA_DIRECTORY", str(DEFAULT_DATA))
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real public scans, read in place (never copied into the repository)."""
    path = Path(os.environ["MONAI_DATA_DIRECTORY"])
    if not path.is_dir():
        pytest.fail(f"MONAI_DATA_DIRECTORY={path} does not exist: the tests need the real data in ../shared/data")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; the CPU twin of this test runs instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
