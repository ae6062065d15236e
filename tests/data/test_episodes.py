"""Episodic datasets on the real CT scans: structure patches, classification and segmentation episodes, seeds,
epochs, MONAI Dataset / CacheDataset / PersistentDataset, DataLoader workers, and every error with its message.

Each scan is read once per module (CT-2, a JPEG 2000 DICOM series, costs about a second): the patches and the
segmentation subjects are module-scoped fixtures.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from monai_metalearn.data import (
    ClassificationEpisodeDataset,
    LoadScand,
    SegmentationEpisodeDataset,
    build_structure_patches,
    class_counts,
    episode_loader,
    load_datalist,
    patch_transforms,
)

ORGANS = ["liver", "spleen", "stomach", "pancreas", "aorta"]
TOTALSEG_IDS = {"liver": 5, "spleen": 1, "stomach": 6, "pancreas": 7, "aorta": 52}
N_VIEWS = 4  # 5 organs x 2 subjects x 4 views = 40 patches, 8 per class, 4 per (class, subject)
KEYS = ["image", "label"]

# one xdist worker reads the scans once for the whole module (`make test` runs with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("episodes")


def _load_3mm():
    return Compose(
        [
            LoadScand(KEYS),
            Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(KEYS, pixdim=(3, 3, 3), mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


@pytest.fixture(scope="module")
def ct_items(data_dir):
    return load_datalist("totalseg_ct1", data_dir) + load_datalist("totalseg_ct2", data_dir)


@pytest.fixture(scope="module")
def patches(ct_items):
    """Organ patches of CT-1 and CT-2 at 3 mm, read from the files once."""
    return build_structure_patches(ct_items, ORGANS, pixdim=(3, 3, 3), n_views=N_VIEWS, progress=False)


@pytest.fixture(scope="module")
def patch_data(patches):
    return Dataset(patches, transform=patch_transforms(spatial_size=(32, 32, 32)))


@pytest.fixture(scope="module")
def subjects(data_dir):
    """Whole CT subjects at 3 mm, cached: CT-1, its 30-slice crop (same person), CT-2, the MSD spleen case."""
    items = sum(
        (load_datalist(n, data_dir) for n in ("totalseg_ct1", "totalseg_ct1_crop", "totalseg_ct2", "ivadomed_spleen")),
        [],
    )
    return CacheDataset(items, transform=_load_3mm(), progress=False)


def _seg_crop(size=(48, 48, 48)):
    return Compose(
        [
            SpatialPadd(KEYS, spatial_size=size),
            RandCropByPosNegLabeld(KEYS, "label", spatial_size=size, pos=1, neg=0, num_samples=1),
            EnsureTyped(KEYS, track_meta=False),
        ]
    )


def _images(ep):
    return torch.cat([ep["support_image"], ep["query_image"]])


def _assert_same_episode(a, b):
    assert a["classes"] == b["classes"] and a["episode"] == b["episode"]
    assert a["support_subject"] == b["support_subject"] and a["query_subject"] == b["query_subject"]
    for key in ("support_image", "support_label", "query_image", "query_label"):
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- structure patches


def test_structure_patches_are_real_crops(patches, ct_items):
    assert len(patches) == 5 * 2 * N_VIEWS
    assert class_counts(patches) == {c: {"examples": 2 * N_VIEWS, "subjects": 2} for c in sorted(ORGANS)}
    assert {p["subject"] for p in patches} == {"totalseg_ct1", "totalseg_ct2"}
    views = [p["view"] for p in patches if p["class"] == "liver" and p["subject"] == "totalseg_ct2"]
    assert sorted(views) == [0, 1, 2, 3]
    # CT-1 is stored at 3 mm RAS: its crops must hold the whole structure and the very HU values of the scan
    full = LoadScand(KEYS)(ct_items[0])
    compared = 0
    for p in patches:
        assert p["structure_id"] == TOTALSEG_IDS[p["class"]] and p["label"].dtype == torch.uint8
        assert p["image"].shape == p["label"].shape and p["synthetic"] is False and p["modality"] == "CT"
        if p["subject"] != "totalseg_ct1" or p["view"]:
            continue
        sid = p["structure_id"]
        assert int((p["label"] == sid).sum()) == int((full["label"] == sid).sum()) > 100
        offset = np.linalg.solve(full["image"].affine.numpy(), p["image"].affine.numpy()[:, 3])[:3]
        start = np.rint(offset).astype(int)
        assert np.allclose(offset, start, atol=1e-3)
        stop = start + np.asarray(p["image"].shape[1:])
        lo, hi = np.maximum(start, 0), np.minimum(stop, full["image"].shape[1:])  # boxes may overhang the scan
        inside = (0, slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        crop = (0, *(slice(int(x), int(y)) for x, y in zip(lo - start, hi - start)))
        assert full["image"][inside].numel() > 1000
        assert torch.allclose(p["image"][crop], full["image"][inside], atol=0.5)
        assert torch.equal(p["label"][crop].long(), full["label"][inside].long())
        assert not p["image"].shape[1:] == full["image"].shape[1:]
        compared += 1
    assert compared == 5
    assert float(full["label"][0].eq(5).sum()) == 41692  # liver of CT-1, as in the transform tests


# ------------------------------------------------------------------------------------- classification episodes


def test_classification_episode_shapes_labels_and_disjoint(patch_data, patches):
    eps = ClassificationEpisodeDataset(patch_data, n_way=5, k_shot=3, q_query=5, num_episodes=2, seed=0)
    assert len(eps) == 2 and sorted(eps.classes) == sorted(ORGANS)
    ep = eps[0]
    assert ep["support_image"].shape == (15, 1, 32, 32, 32) and ep["query_image"].shape == (25, 1, 32, 32, 32)
    assert ep["support_image"].dtype == torch.float32
    assert ep["support_label"].tolist() == [c for c in range(5) for _ in range(3)]
    assert Counter(ep["query_label"].tolist()) == {c: 5 for c in range(5)}
    assert sorted(ep["classes"]) == sorted(ORGANS) and ep["episode"] == 0
    # every example belongs to its episode class and subject; 3 + 5 = all 8 examples of each class, none twice
    idx = eps.episode(0)
    assert len(set(idx.support) | set(idx.query)) == 40 and not set(idx.support) & set(idx.query)
    labels = ep["support_label"].tolist() + ep["query_label"].tolist()
    for j, y, s in zip(idx.support + idx.query, labels, ep["support_subject"] + ep["query_subject"]):
        assert patches[j]["class"] == ep["classes"][y] and patches[j]["subject"] == s
    # z-scored, and 40 different patches (views of one crop differ by their random jitter)
    images = _images(ep).flatten(1)
    assert torch.allclose(images.mean(1), torch.zeros(40), atol=1e-4)
    assert torch.allclose(images.std(1), torch.ones(40), atol=1e-3)
    assert torch.unique(images, dim=0).shape[0] == 40
    with pytest.raises(IndexError, match=r"episode 2 out of range 0\.\.1"):
        eps[2]


def test_classification_images_are_the_examples_patches(patches):
    """With the deterministic centred crop, episode image i is exactly patch_transforms of example j."""
    transform = patch_transforms(spatial_size=(32, 32, 32), augment=False)
    fixed = [dict(p, image=transform(p)["image"]) for p in patches]  # a plain list of dicts holding tensors
    eps = ClassificationEpisodeDataset(fixed, n_way=3, k_shot=2, q_query=2, num_episodes=3, seed=4)
    for i in range(3):
        ep, idx = eps[i], eps.episode(i)
        for pos, j in enumerate(idx.support + idx.query):
            assert torch.equal(_images(ep)[pos], fixed[j]["image"])
    # the liver patch and the aorta patch of CT-1 differ: labels are attached to the right images
    liver = next(p["image"] for p in fixed if p["class"] == "liver" and p["subject"] == "totalseg_ct1")
    aorta = next(p["image"] for p in fixed if p["class"] == "aorta" and p["subject"] == "totalseg_ct1")
    assert not torch.allclose(liver, aorta, atol=0.1)


def test_cross_subject_episodes_share_no_subject(patch_data, patches):
    eps = ClassificationEpisodeDataset(patch_data, 5, 2, 3, num_episodes=8, cross_subject=True, seed=1)
    support_sides = Counter()
    for i in range(len(eps)):
        idx = eps.episode(i)
        sup = {patches[j]["subject"] for j in idx.support}
        qry = {patches[j]["subject"] for j in idx.query}
        assert len(sup) == len(qry) == 1 and not sup & qry  # two subjects: one per side
        support_sides.update(sup)
    assert set(support_sides) == {"totalseg_ct1", "totalseg_ct2"}  # both sides are drawn
    ep = eps[3]
    assert not set(ep["support_subject"]) & set(ep["query_subject"])
    assert ep["support_image"].shape == (10, 1, 32, 32, 32) and ep["query_image"].shape == (15, 1, 32, 32, 32)
    # without cross_subject, the same setting mixes subjects across support and query
    mixed = ClassificationEpisodeDataset(patch_data, 5, 2, 3, num_episodes=8, seed=1)

    def subjects_of(indices):
        return {patches[j]["subject"] for j in indices}

    assert any(subjects_of(mixed.episode(i).support) & subjects_of(mixed.episode(i).query) for i in range(8))


def test_seeds_and_epochs(patch_data):
    kw = dict(n_way=3, k_shot=1, q_query=2, num_episodes=2)
    a = ClassificationEpisodeDataset(patch_data, seed=0, **kw)
    first = a[0]
    _assert_same_episode(first, ClassificationEpisodeDataset(patch_data, seed=0, **kw)[0])
    assert not torch.equal(first["support_image"], a[1]["support_image"])
    other = ClassificationEpisodeDataset(patch_data, seed=1, **kw)[0]
    assert other["classes"] != first["classes"] or not torch.equal(_images(other), _images(first))

    a.set_epoch(1)
    next_epoch = a[0]
    assert next_epoch["episode"] == 2 and not torch.equal(_images(next_epoch), _images(first))
    b = ClassificationEpisodeDataset(patch_data, seed=0, **kw)
    b.set_epoch(1)
    _assert_same_episode(b[0], next_epoch)
    # epoch e serves episodes e*n .. e*n+n-1 of one long list
    _assert_same_episode(ClassificationEpisodeDataset(patch_data, seed=0, **{**kw, "num_episodes": 4})[2], next_epoch)
    a.set_epoch(0)
    _assert_same_episode(a[0], first)


def test_same_episodes_over_dataset_cache_and_persistent(patches, tmp_path):
    transform = Compose([EnsureTyped("image", dtype=torch.float32), *patch_transforms().transforms])
    bases = {
        "Dataset": Dataset(patches, transform=transform),
        "CacheDataset": CacheDataset(patches, transform=transform, progress=False),
        "PersistentDataset": PersistentDataset(patches, transform=transform, cache_dir=tmp_path),
    }
    datasets = {
        name: ClassificationEpisodeDataset(base, 4, 1, 2, num_episodes=2, seed=5) for name, base in bases.items()
    }
    episodes = {name: [eps[i] for i in range(2)] for name, eps in datasets.items()}
    for name in ("CacheDataset", "PersistentDataset"):
        for ours, ref in zip(episodes[name], episodes["Dataset"]):
            _assert_same_episode(ours, ref)
    # one cache file per distinct example read (4-way 1+2 = 12 reads per episode); reading again adds none. The
    # random crops must not change the in-memory examples, or their hashes would change and every read miss.
    eps = datasets["PersistentDataset"]
    read = {j for i in range(2) for j in eps.episode(i).support + eps.episode(i).query}
    assert 12 < len(read) <= 24 and len(list(tmp_path.glob("*.pt"))) == len(read)
    _assert_same_episode(eps[1], episodes["Dataset"][1])
    assert len(list(tmp_path.glob("*.pt"))) == len(read)


@pytest.mark.slow
def test_episode_loader_workers_give_the_same_episodes(patch_data):
    eps = ClassificationEpisodeDataset(patch_data, 5, 1, 1, num_episodes=4, seed=2)
    serial = list(episode_loader(eps, num_workers=0))
    parallel = list(episode_loader(eps, num_workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        _assert_same_episode(a, b)
    assert [e["episode"] for e in parallel] == [0, 1, 2, 3]
    _assert_same_episode(serial[1], eps[1])
    batches = list(episode_loader(eps, meta_batch_size=2, num_workers=2))
    assert len(batches) == 2 and all(isinstance(b, list) and len(b) == 2 for b in batches)
    _assert_same_episode(batches[1][1], serial[3])


# --------------------------------------------------------------------------------------- segmentation episodes


def test_segmentation_episodes(subjects):
    seg = SegmentationEpisodeDataset(
        subjects, ["liver", "spleen"], k_shot=1, q_query=1, num_episodes=6, episode_transform=_seg_crop(), seed=0
    )
    # one example per person: the CT-1 crop (item 1) is CT-1's subject, so it never stands for a second subject
    assert seg.index["liver"] == {"totalseg_ct1": 0, "totalseg_ct2": 2}
    assert seg.index["spleen"] == {"totalseg_ct1": 0, "totalseg_ct2": 2, "msd_spleen_2": 3}
    seen = set()
    for i in range(len(seg)):
        ep = seg[i]
        seen.add(ep["structure"])
        assert ep["structure"] in ("liver", "spleen") and ep["episode"] == i
        assert ep["support_subject"] != ep["query_subject"]
        for part in ("support", "query"):
            img, mask = ep[f"{part}_image"], ep[f"{part}_label"]
            assert img.shape == mask.shape == (1, 1, 48, 48, 48)
            assert set(torch.unique(mask).tolist()) == {0.0, 1.0}  # binary and non-empty (a positive-centred crop)
            assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.05
    assert seen == {"liver", "spleen"}
    same = SegmentationEpisodeDataset(
        subjects, ["liver", "spleen"], 1, 1, num_episodes=6, episode_transform=_seg_crop(), seed=0
    )
    _assert_same_episode_seg(seg[2], same[2])


def _assert_same_episode_seg(a, b):
    assert a["structure"] == b["structure"] and a["support_subject"] == b["support_subject"]
    for key in ("support_image", "support_label", "query_image", "query_label"):
        assert torch.equal(a[key], b[key]), key


def test_segmentation_masks_are_the_structure(subjects):
    """Whole volumes (stack=False): each mask is exactly ``label == id`` of its subject, the image untouched."""
    seg = SegmentationEpisodeDataset(subjects, ["spleen"], k_shot=1, q_query=2, num_episodes=3, seed=3, stack=False)
    ids = {"totalseg_ct1": 1, "totalseg_ct2": 1, "msd_spleen_2": 1}
    for i in range(3):
        ep = seg[i]
        structure, support, query = seg.episode(i)
        assert structure == "spleen" and len(ep["support_image"]) == 1 and len(ep["query_image"]) == 2
        names = ep["support_subject"] + ep["query_subject"]
        assert sorted(names) == sorted(ids)  # 1 + 2 = the three spleen subjects, all different
        for j, name, img, mask in zip(
            support + query, names, ep["support_image"] + ep["query_image"], ep["support_label"] + ep["query_label"]
        ):
            ref = subjects[j]
            assert torch.equal(mask, (ref["label"] == ids[name]).float())
            assert torch.equal(img, ref["image"]) and mask.shape == ref["label"].shape
            assert float(mask.sum()) > 1000  # a spleen at 3 mm: thousands of voxels
    # epochs: new episodes, reproducible
    first = [seg.episode(i) for i in range(3)]
    seg.set_epoch(1)
    assert [seg.episode(i) for i in range(3)] != first
    assert seg[0]["episode"] == 3
    again = SegmentationEpisodeDataset(subjects, ["spleen"], 1, 2, num_episodes=3, seed=3, stack=False)
    again.set_epoch(1)
    assert [again.episode(i) for i in range(3)] == [seg.episode(i) for i in range(3)]


# ------------------------------------------------------------------------------------------------------ errors


def test_classification_errors(patch_data, patches):
    # drop two views of CT-2's pancreas: pancreas has 6 examples, every other organ 8
    drop = ("pancreas", "totalseg_ct2", True)
    fewer = Dataset([p for p in patches if (p["class"], p["subject"], p["view"] >= 2) != drop])
    ClassificationEpisodeDataset(fewer, 5, 2, 4, num_episodes=1)  # 6 examples are enough for 2 + 4
    short = r"^1 class\(es\) have fewer than k_shot \+ q_query = 7 examples: 'pancreas' \(6\)\. Lower k_shot"
    with pytest.raises(ValueError, match=short):
        ClassificationEpisodeDataset(fewer, 5, 3, 4, num_episodes=1)
    all_short = r"5 class\(es\) have fewer than k_shot \+ q_query = 9 examples: 'aorta' \(8\), 'liver' \(8\)"
    with pytest.raises(ValueError, match=all_short):
        ClassificationEpisodeDataset(patch_data, 5, 5, 4, num_episodes=1)
    with pytest.raises(ValueError, match=r"n_way=6 but only 5 classes are available"):
        ClassificationEpisodeDataset(patch_data, 6, 1, 1, num_episodes=1)
    with pytest.raises(
        ValueError,
        match=r"cross_subject=True: 5 class\(es\) cannot give 5 support and 1 query examples from disjoint subjects"
        r".*'liver': \{'totalseg_ct1': 4, 'totalseg_ct2': 4\}",
    ):
        ClassificationEpisodeDataset(patch_data, 2, 5, 1, num_episodes=1, cross_subject=True)
    no_subject = [{k: v for k, v in p.items() if k != "subject"} for p in patches]
    with pytest.raises(KeyError, match=r"item 0 has no 'subject' key"):
        ClassificationEpisodeDataset(no_subject, 2, 1, 1, num_episodes=1, cross_subject=True)
    with pytest.raises(TypeError, match="episodic datasets need a MONAI Dataset"):
        ClassificationEpisodeDataset([1, 2, 3], 2, 1, 1, num_episodes=1)


def test_segmentation_errors(subjects):
    with pytest.raises(
        ValueError,
        match=r"1 structure\(s\) are present in fewer than k_shot \+ q_query = 3 distinct subjects: "
        r"'liver' in \['totalseg_ct1', 'totalseg_ct2'\]",
    ):
        SegmentationEpisodeDataset(subjects, ["liver", "spleen"], k_shot=2, q_query=1, num_episodes=1)
    with pytest.raises(ValueError, match=r"structures \['brain'\] are in no item's 'structures' map"):
        SegmentationEpisodeDataset(subjects, ["brain"], 1, 1, num_episodes=1)
    with pytest.raises(ValueError, match="structures is empty"):
        SegmentationEpisodeDataset(subjects, [], 1, 1, num_episodes=1)
    # a structure listed for a scan whose label map does not hold it (CT-2 has no left kidney, id 3)
    ct1, ct2 = dict(subjects[0]), dict(subjects[2])
    ct2["structures"] = {**ct2["structures"], "kidney_left": 3}
    seg = SegmentationEpisodeDataset([ct1, ct2], ["kidney_left"], 1, 1, num_episodes=1, seed=0)
    with pytest.raises(ValueError, match=r"structure 'kidney_left' \(id 3\) is absent from .*example_seg_dicom"):
        seg[0]


def test_structure_absent_from_a_scan_when_building_patches(data_dir):
    ct2 = load_datalist("totalseg_ct2", data_dir)[0]
    label_only = {"label": ct2["label"], "subject": ct2["subject"], "structures": {"liver": 5, "kidney_left": 3}}
    with pytest.raises(
        ValueError, match=r"structure 'kidney_left' \(id 3\) has 0 voxel\(s\) < min_voxels=8 in subject 'totalseg_ct2'"
    ):
        build_structure_patches([label_only], progress=False)
    with pytest.raises(ValueError, match=r"structures \['kidney'\] are in no subject"):
        build_structure_patches([label_only], ["kidney"], progress=False)
