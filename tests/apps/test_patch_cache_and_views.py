"""Fixed evaluation views (render_patches) and the bundle's patch cache, on the real CT-1 scan."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.apps import classification as app
from monai_metalearn.data import patch_transforms, render_patches

pytestmark = pytest.mark.xdist_group("ct1_patches")


@pytest.fixture(scope="module")
def cached(tmp_path_factory, data_dir):
    cache = tmp_path_factory.mktemp("cache")
    patches = app.load_structure_patches(data_dir, ["totalseg_ct1"], ["liver", "spleen"], (3.0, 3.0, 3.0), 2,
                                         progress=False, cache_dir=cache)
    return cache, patches


def test_patch_cache_is_reused_and_equal(cached, data_dir, monkeypatch):
    cache, patches = cached
    files = list(cache.glob("patches_*.pt"))
    assert len(files) == 1
    import monai_metalearn.data as data

    def boom(*args, **kwargs):
        raise AssertionError("scans re-read although the cache holds these patches")

    monkeypatch.setattr(data, "build_structure_patches", boom)
    again = app.load_structure_patches(data_dir, ["totalseg_ct1"], ["liver", "spleen"], (3.0, 3.0, 3.0), 2,
                                       progress=False, cache_dir=cache)
    assert [(p["class"], p["view"]) for p in again] == [(p["class"], p["view"]) for p in patches]
    for a, b in zip(again, patches):
        assert torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))
    # other settings -> another cache file, built from the scans
    monkeypatch.undo()
    app.load_structure_patches(data_dir, ["totalseg_ct1"], ["liver"], (3.0, 3.0, 3.0), 2, progress=False,
                               cache_dir=cache)
    assert len(list(cache.glob("patches_*.pt"))) == 2


def test_damaged_cache_is_rebuilt(cached, data_dir):
    cache, patches = cached
    f = next(iter(sorted(cache.glob("patches_*.pt"))))
    f.write_bytes(b"truncated")
    again = app.load_structure_patches(data_dir, ["totalseg_ct1"], ["liver", "spleen"], (3.0, 3.0, 3.0), 2,
                                       progress=False, cache_dir=cache)
    assert len(again) == len(patches)


def test_render_patches_fixed_views(cached):
    _, patches = cached
    t = patch_transforms((16, 16, 16))
    a = render_patches(patches, t, seed=3)
    b = render_patches(patches, t, seed=3)
    c = render_patches(patches, t, seed=4)
    assert len(a) == len(patches) == 4  # 2 structures x 2 views
    for x, y, z, p in zip(a, b, c, patches):
        assert x["image"].shape == (1, 16, 16, 16) and x["image"].dtype == torch.float32
        assert torch.equal(x["image"], y["image"])  # same seed, same view
        assert not torch.equal(x["image"], z["image"])  # other seed, other jitter
        assert x["class"] == p["class"] and x["subject"] == "totalseg_ct1" and x["view"] == p["view"]
        assert "label" not in x  # the answer is not carried along
        assert abs(float(x["image"].mean())) < 1e-4  # z-scored
    # the two views of one structure differ (random jitter per item)
    assert not torch.equal(a[0]["image"], a[1]["image"])
