"""Real scans for the registration tests: BTCV subject 7 (abdominal CT, 8-bit windowed), read as the project does."""

from __future__ import annotations

import pytest


def _read(data_dir, subject: int, pixdim):
    from monai_metalearn.data import scan_reader

    root = data_dir / "btcv_sabs"
    item = {"image": str(root / f"image_{subject}.nii.gz"), "label": str(root / f"label_{subject}.nii.gz")}
    return scan_reader(["image", "label"], pixdim)(item)


@pytest.fixture(scope="session")
def ct5(data_dir):
    """BTCV subject 7 at 5 mm isotropic (``image``, ``label``; MetaTensors ``[1, *S]``, RAS)."""
    return _read(data_dir, 7, (5.0, 5.0, 5.0))


@pytest.fixture(scope="session")
def ct4(data_dir):
    """BTCV subject 7 at 4 mm isotropic."""
    return _read(data_dir, 7, (4.0, 4.0, 4.0))


@pytest.fixture(scope="session")
def ct_native(data_dir):
    """BTCV subject 7 on its own grid (1.27 x 1.27 x 3 mm)."""
    return _read(data_dir, 7, None)
