"""Registration at scale on real BTCV scans: several atlases of one query in one problem (``register_many``) give
the results of one ``register`` per atlas (bit for bit on the CPU with per-item kernels, to float tolerance with
batched kernels), ``AtlasSegmenter(atlas_batch_size=...)`` uses it, and ``segment_task`` spreads queries over 2 gloo
ranks with rank 0 writing the union."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from monai_metalearn.errors import ConfigError, DataError, MetaLearnError
from monai_metalearn.registration import (
    RegistrationConfig,
    Similarity,
    body_mask,
    dice_per_label,
    grid_points,
    image_grid,
    normalize_intensity,
    register,
    register_many,
    sample,
)
from monai_metalearn.registration.batched import _FixedLNCC, _MovingLevel, _BatchAffine, item_losses
from monai_metalearn.registration.pairwise import _AffineParams

PIX = 6.0
#: a short schedule of every stage (initial search, multi-start, affine, deformable): equivalence, not accuracy
FAST = {"spacing": PIX, "levels": (2, 1), "iterations": (10, 5), "affine_levels": (2, 1), "affine_iterations": (20, 10),
        "initial_refine_iterations": 5}
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 6: "liver"}


def _read(data_dir, subject: int):
    from monai_metalearn.data import scan_reader

    root = data_dir / "btcv_sabs"
    item = {"image": str(root / f"image_{subject}.nii.gz"), "label": str(root / f"label_{subject}.nii.gz")}
    return scan_reader(["image", "label"], (PIX, PIX, PIX))(item)


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def scans(data_dir):
    """Query BTCV 7, atlases BTCV 0 and 3 at 6 mm: three different grids (the atlases are padded onto a canvas)."""
    return {s: _read(data_dir, s) for s in (7, 0, 3)}


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def separate(scans):
    """One ``register`` per atlas: the reference."""
    torch.set_num_threads(1)
    return [register(scans[a]["image"], scans[7]["image"], **FAST) for a in (0, 3)]


def _agreement(r1, r2, atlas) -> dict[int, float]:
    return dice_per_label(r1.warp_label(atlas["label"]), r2.warp_label(atlas["label"]), tuple(ORGANS))


# ------------------------------------------------------------------------------------------------ equivalence
def test_per_item_kernels_give_the_separate_registrations_bit_for_bit(scans, separate):
    """CPU default (``vectorize=False``): the same arithmetic as ``register``, so every transform, field and loss
    curve is identical, though the two atlases were optimised together (multi-start trials of both in one run)."""
    batched = register_many([scans[0]["image"], scans[3]["image"]], scans[7]["image"], **FAST)
    for one, many, atlas in zip(separate, batched, (0, 3)):
        assert torch.equal(one.affine, many.affine), atlas
        assert torch.equal(one.field, many.field), atlas
        assert one.field_grid.same_as(many.field_grid, atol=0)
        assert one.losses == many.losses
        assert one.initial["restart_choice"] == many.initial["restart_choice"]
        assert many.timings["batch_size"] == 2.0
    # and the registrations are real ones: the liver of atlas 0 lands on the query's liver
    liver = dice_per_label(batched[0].warp_label(scans[0]["label"]), scans[7]["label"], [6])[6]
    assert liver > 0.7, liver
    # the two atlases did not share a result
    assert not torch.equal(batched[0].affine, batched[1].affine)


def test_batched_kernels_agree_with_the_separate_registrations(scans, separate):
    """``vectorize=True`` (the CUDA path, run here on the CPU): one canvas, one kernel per operation for the batch.
    Float rounding differs (reductions in another order), so the paths drift a little over the iterations; the
    warped organs must still agree closely, and each item's first losses must match to float tolerance."""
    batched = register_many([scans[0]["image"], scans[3]["image"]], scans[7]["image"], vectorize=True, **FAST)
    query = scans[7]["image"]
    inside = body_mask(normalize_intensity(query.as_tensor())[None]).reshape(-1)
    body = grid_points(image_grid(query)).reshape(-1, 3)[inside]
    for one, many, atlas in zip(separate, batched, (0, 3)):
        assert one.losses["initial"] == many.losses["initial"]  # the initial search is per item, identical
        assert many.losses["affine"][0][0] == pytest.approx(one.losses["affine"][0][0], abs=1e-5)
        agree = _agreement(one, many, scans[atlas])
        assert agree[6] > 0.98, (atlas, agree)  # liver
        assert sum(agree.values()) / len(agree) > 0.95, (atlas, agree)
        # the whole transforms, over the query's body: a fraction of a 6 mm voxel apart on average (as far as the
        # query scaled by 1 + 1e-6 moves the separate registration: 0.2 and 0.8 mm, measured)
        dist = (one.transform_points(body) - many.transform_points(body)).norm(dim=1)
        assert float(dist.mean()) < 1.5, (atlas, float(dist.mean()))


@pytest.mark.gpu
def test_cuda_batch_agrees_with_cuda_registrations_one_by_one(scans):
    """On CUDA ``register_many`` batches its kernels by default (the CPU twin: the test above)."""
    query = scans[7]["image"].to("cuda")
    atlases = [scans[a]["image"].to("cuda") for a in (0, 3)]
    separate = [register(a, query, **FAST) for a in atlases]
    batched = register_many(atlases, query, **FAST)
    inside = body_mask(normalize_intensity(scans[7]["image"].as_tensor())[None]).reshape(-1)
    body = grid_points(image_grid(scans[7]["image"])).reshape(-1, 3)[inside].cuda()
    for one, many, atlas in zip(separate, batched, (0, 3)):
        assert many.field.device.type == "cuda"
        label = scans[atlas]["label"].to("cuda")
        agree = dice_per_label(one.warp_label(label).cpu(), many.warp_label(label).cpu(), tuple(ORGANS))
        assert agree[6] > 0.98, (atlas, agree)
        dist = (one.transform_points(body) - many.transform_points(body)).norm(dim=1)
        assert float(dist.mean()) < 1.5, (atlas, float(dist.mean()))


def test_batch_size_splits_the_batch_and_keeps_the_results(scans):
    """Three atlases, two per problem (affine stage alone, from the identity): the results of three ``register``
    calls, the third atlas (a copy of the first) with the first's result."""
    cheap = {"stages": ("affine",), "spacing": PIX, "affine_levels": (2, 1), "affine_iterations": (15, 5),
             "affine_dof": (7, 12)}
    movings = [scans[0]["image"], scans[3]["image"], scans[0]["image"]]
    batched = register_many(movings, scans[7]["image"], batch_size=2, **cheap)
    assert [r.timings["batch_size"] for r in batched] == [2.0, 2.0, 1.0]
    for m, r in zip(movings, batched):
        assert torch.equal(register(m, scans[7]["image"], **cheap).affine, r.affine)
        assert r.field is None and not torch.equal(r.affine, torch.eye(4, dtype=torch.float64))
    assert torch.equal(batched[0].affine, batched[2].affine)


def test_an_affine_similarity_other_than_the_deformable_one(scans):
    """``affine_similarity="mind"`` with LNCC for the deformable stage: both stages use their own features (the
    separate path used to fail here with an AttributeError), and the batch gives the same result."""
    cfg = {"stages": ("affine", "deformable"), "spacing": PIX, "affine_levels": (2,), "affine_iterations": (8,),
           "affine_dof": 12, "affine_similarity": "mind", "levels": (1,), "iterations": (3,)}
    one = register(scans[3]["image"], scans[7]["image"], **cfg)
    many = register_many([scans[3]["image"]], scans[7]["image"], **cfg)[0]
    assert torch.equal(one.affine, many.affine) and torch.equal(one.field, many.field)
    mind_only = register(scans[3]["image"], scans[7]["image"], **{**cfg, "similarity": "mind"})
    assert one.losses["affine"] == mind_only.losses["affine"]  # the affine stage ran on MIND-SSC
    assert one.losses["deformable"] != mind_only.losses["deformable"]


# ------------------------------------------------------------------------------------------------ building blocks
def _crops(scan, n: int) -> torch.Tensor:
    """``n`` different 20^3 crops of a real scan, normalised: ``[n, 1, 20, 20, 20]``."""
    x = normalize_intensity(scan["image"].as_tensor())[None]
    return torch.cat([x[:, :, 10 + 3 * i:30 + 3 * i, 15:35, 20:40] for i in range(n)])


@pytest.mark.parametrize("name", ["lncc", "mind", "ncc", "mi"])
def test_item_losses_are_the_per_item_similarities(scans, name):
    sim = Similarity(name, kernel_size=5)
    crops = _crops(scans[0], 3)
    mask = (crops > 0.3).float()  # [3, 1, *S]: a different region per item
    moved, fixed = torch.cat([sim.features(c[None]) for c in crops]), sim.features(_crops(scans[7], 1))
    expected = torch.stack([sim(moved[b:b + 1], fixed, mask[b:b + 1]) for b in range(3)])
    assert len(set(expected.tolist())) == 3  # three different losses
    lncc = _FixedLNCC(sim, fixed) if name == "lncc" else None
    assert torch.equal(item_losses(sim, moved, fixed, mask, lncc, vectorize=False), expected)
    assert torch.allclose(item_losses(sim, moved, fixed, mask, lncc, vectorize=True), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(item_losses(sim, moved, fixed, None, vectorize=True),
                          torch.stack([sim(moved[b:b + 1], fixed) for b in range(3)]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must agree"):
        item_losses(sim, moved, fixed[..., :-1])


def test_canvas_sampling_equals_each_image_on_its_own_grid(scans):
    """Three scans of different shapes on one zero-padded canvas: sampled at points inside, on the edge of and
    outside each field of view, each item gives what ``sample`` gives on its own grid, and the field-of-view test
    (``inside``) agrees voxel for voxel."""
    imgs = [normalize_intensity(scans[s]["image"].as_tensor())[None] for s in (0, 3, 7)]
    grids = [image_grid(scans[s]["image"]) for s in (0, 3, 7)]
    assert len({g.shape for g in grids}) == 3
    pts = grid_points(grids[2]).reshape(-1, 3)[::7]
    y = torch.stack([pts + torch.tensor([0.0, 0.0, 40.0 * k]) for k in range(3)])  # shifted out of some fields
    vec = _MovingLevel(imgs, grids, [None] * 3, True, "cpu")
    loop = _MovingLevel(imgs, grids, [None] * 3, False, "cpu")
    shape = (y.shape[1], 1, 1)
    got = vec.pull(y, None, shape)
    for k in range(3):
        want = sample(imgs[k], grids[k].affine, y[k]).reshape(1, 1, *shape)
        assert torch.allclose(got[k:k + 1], want, atol=1e-5)
        assert torch.equal(loop.pull(y, None, shape)[k:k + 1], want)
    inside_vec, inside_loop = vec.inside(y, None, shape, True), loop.inside(y, None, shape, True)
    assert 0 < float(inside_loop.mean()) < 1  # some points outside
    assert float((inside_vec != inside_loop).float().mean()) < 1e-3
    index = torch.tensor([2, 0, 2])  # items chosen by index (the multi-start trials)
    assert torch.allclose(vec.pull(y, index, shape)[1:2], loop.pull(y, index, shape)[1:2], atol=1e-5)


def test_batched_affine_parameters_are_the_per_item_ones():
    torch.manual_seed(0)
    batch = _BatchAffine(4, True, "cpu")
    with torch.no_grad():
        for p in (batch.w, batch.s, batch.a, batch.m, batch.t):
            p.normal_(0, 0.1)
    centre = torch.tensor([10.0, -20.0, 30.0])
    mats = batch.matrices(centre, 150.0)
    for b in range(4):
        one = _AffineParams("cpu")
        with torch.no_grad():
            for name in "wsamt":
                getattr(one, name).copy_(getattr(batch, name)[b])
        assert torch.allclose(mats[b], one.matrix(centre, 150.0), atol=1e-5)
    assert len(batch.free(7)) == 3 and len(_BatchAffine(4, False, "cpu").free(12)) == 4 * 5


def test_register_many_errors_name_what_is_wrong(scans):
    q, a = scans[7]["image"], scans[0]["image"]
    with pytest.raises(ValueError, match="movings is empty"):
        register_many([], q)
    with pytest.raises(ValueError, match="1 moving_masks for 2 moving images"):
        register_many([a, a], q, moving_masks=[None])
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            register_many([a], q, batch_size=bad)
    with pytest.raises(TypeError, match=r"unknown settings \['iters'\]"):
        register_many([a], q, iters=3)
    with pytest.raises(ValueError, match=r"moving_masks\[1\] has spatial shape"):
        register_many([a, a], q, moving_masks=[None, torch.ones(1, 4, 4, 4)])
    with pytest.raises(ValueError, match=r"movings\[1\]: .*MetaTensor"):
        register_many([a, torch.rand(1, 8, 8, 8)], q)
    with pytest.raises(ValueError, match="similarity"):
        register_many([a], q, config=RegistrationConfig(), similarity="ssd")


# ------------------------------------------------------------------------------------------------ atlas learner
def test_atlas_segmenter_registers_the_atlases_of_a_query_together(scans, separate):
    """``atlas_batch_size`` > 1: the two atlases go through one ``register_many`` problem, whose results (CPU) are
    the separate registrations, so the fused prediction is the one-at-a-time learner's."""
    from monai_metalearn.learners import AtlasSegmenter

    atlases = [scans[0]["image"], scans[3]["image"]]
    masks = [(scans[a]["label"] == 6).float() for a in (0, 3)]
    query = scans[7]["image"]
    batched = AtlasSegmenter(fusion="staple", registration=FAST, atlas_batch_size=4)
    pred = batched.adapt(atlases, masks)(query[None]).argmax(1)
    assert [t["batch_size"] for t in batched.last_timings] == [2.0, 2.0]
    # one at a time, its cache holding the separate registrations: the same prediction
    loop = AtlasSegmenter(fusion="staple", registration=FAST, atlas_batch_size=1)
    for image, result in zip(atlases, separate):
        loop._cache[loop.cache_key(image, query)] = result
    assert torch.equal(loop.adapt(atlases, masks)(query[None]).argmax(1), pred)
    assert loop.last_timings == []  # nothing registered again
    for image, result in zip(atlases, separate):
        assert torch.equal(batched._cache[batched.cache_key(image, query)].field, result.field)
    dice = dice_per_label(pred, (scans[7]["label"].as_tensor() == 6).long(), [1])[1]
    assert dice > 0.7, dice


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4"])
def test_atlas_batch_size_is_validated(bad):
    from monai_metalearn.learners import AtlasSegmenter

    with pytest.raises(ValueError, match="atlas_batch_size must be a positive integer"):
        AtlasSegmenter(atlas_batch_size=bad)


# ------------------------------------------------------------------------------------------------ queries over ranks
def test_shard_and_gather_without_a_process_group():
    from monai_metalearn.engines import gather_results, shard_queries

    items = list("abcde")
    shares = [shard_queries(items, rank=r, world_size=2) for r in range(2)]
    assert shares == [[(0, "a"), (2, "c"), (4, "e")], [(1, "b"), (3, "d")]]
    assert shard_queries(items) == list(enumerate(items))  # no process group: everything
    assert gather_results(shard_queries(items), 5) == items
    with pytest.raises(MetaLearnError, match=r"items \[1, 3\] are missing"):
        gather_results(shares[0], 5)
    with pytest.raises(MetaLearnError, match="computed by several ranks"):
        gather_results(shares[0] + shares[0][:1], 3)
    with pytest.raises(DataError, match="bad scan"):
        gather_results([], 0, error=DataError("bad scan"))
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.1"):
        shard_queries(items, rank=2, world_size=2)


#: a cheap atlas learner for the task tests: centres of gravity, then one short affine level at 8 mm
CHEAP_ATLAS = {"stages": ["initial", "affine"], "spacing": 8.0, "affine_levels": [1], "affine_iterations": [10],
               "affine_dof": 12, "initial": "centroid", "initial_refine_iterations": 0}


def _task(data_dir: Path, folder: Path, bad_query: bool = False) -> Path:
    root = data_dir / "btcv_sabs"
    queries = [{"image": str(root / f"image_{s}.nii.gz"), "id": f"btcv{s}"} for s in (3, 5, 7)]
    if bad_query:  # two queries that are not scans, one per rank: both ranks fail
        queries = []
        for r in range(2):
            (folder / f"broken{r}.nii.gz").write_bytes(b"not a nifti file")
            queries.append({"image": str(folder / f"broken{r}.nii.gz")})
    task = {"modality": "CT", "intensity": "ct_windowed",
            "support": [{"image": str(root / "image_0.nii.gz"), "label": str(root / "label_0.nii.gz"),
                         "label_value": 6}], "query": queries}
    path = folder / ("bad.json" if bad_query else "task.json")
    path.write_text(json.dumps(task))
    return path


def _segment(task: Path, out: Path):
    from monai_metalearn.apps.segmentation import segment_task
    from monai_metalearn.learners import AtlasSegmenter

    learner = AtlasSegmenter(registration=CHEAP_ATLAS, spacing=(8.0, 8.0, 8.0))
    result = segment_task(learner, str(task), str(out), pixdim=(8.0, 8.0, 8.0))
    return result, len(learner.last_timings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, task: str, bad: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from monai_metalearn.engines import destroy_distributed, gather_results, init_distributed

    init_distributed("gloo")
    record: dict = {}
    record["result"], record["registrations"] = _segment(Path(task), Path(out) / "masks")
    try:  # a query fails on each rank: every rank raises rank 0's error
        _segment(Path(bad), Path(out) / "bad")
    except DataError as err:
        record["error"] = str(err)
    try:  # both ranks claim item 0
        gather_results([(0, rank)], 1)
    except MetaLearnError as err:
        record["duplicate"] = str(err)
    destroy_distributed()
    torch.save(record, Path(out) / f"rank{rank}.pt")


@pytest.mark.xdist_group("distributed")
def test_two_gloo_ranks_split_the_queries_and_rank0_writes_their_union(data_dir, tmp_path):
    """3 queries on 2 ranks: rank 0 registers queries 0 and 2, rank 1 query 1; rank 0 writes every mask, equal to
    the single process's, and both ranks return the single process's result."""
    import nibabel as nib

    task, bad = _task(data_dir, tmp_path), _task(data_dir, tmp_path, bad_query=True)
    single, n_single = _segment(task, tmp_path / "single")
    assert n_single == 3
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(_rank, args=(2, _free_port(), str(task), str(bad), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 240
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank gloo run did not finish within 240 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["registrations"] for r in ranks] == [2, 1]  # no query lost, none done twice
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == ["btcv3_seg.nii.gz", "btcv5_seg.nii.gz", "btcv7_seg.nii.gz", "segmentations.json"]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == names
    def listed(result: dict) -> list[dict]:  # the outputs, with the mask's file name (the folders differ)
        return [{**s, "mask": Path(s["mask"]).name} for s in result["segmentations"]]

    for r in ranks:
        assert listed(r["result"]) == listed(single) and r["result"]["k_shot"] == single["k_shot"] == 1
    assert listed(json.loads((tmp_path / "masks" / "segmentations.json").read_text())) == listed(single)
    for name in names[:3]:
        a = nib.load(tmp_path / "single" / name)
        b = nib.load(tmp_path / "masks" / name)
        assert a.get_fdata().sum() > 100 and (a.get_fdata() == b.get_fdata()).all()
        assert (a.affine == b.affine).all()
    assert ranks[0]["error"] == ranks[1]["error"] and "query[0]" in ranks[0]["error"]
    assert "broken0.nii.gz" in ranks[0]["error"]
    assert not (tmp_path / "bad").exists()  # nothing written when a query failed
    assert "computed by several ranks" in ranks[0]["duplicate"] and ranks[0]["duplicate"] == ranks[1]["duplicate"]
