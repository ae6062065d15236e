"""Episodes are a pure function of ``(seed, epoch, index)``: the same tensors, with augmentation on, whether they are
built in the main process, by ``DataLoader`` worker processes (persistent ones across ``set_epoch`` included), by
``monai.data.ThreadDataLoader`` thread workers, by two threads at once, or under ``MetaTrainer``.

Real data: organ patches of TotalSegmentator CT-1 at 3 mm (read once per module, a fraction of a second) and, for
segmentation episodes, CT-1 and the MSD spleen case. Every loader is driven across two epochs the way
``MetaTrainer`` does it: ``dataset.set_epoch(e)`` before each epoch's iteration.
"""

from __future__ import annotations

import copy
import math
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    Randomizable,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from monai_metalearn.data import (
    ClassificationEpisodeDataset,
    EpochIndexSampler,
    LoadScand,
    SegmentationEpisodeDataset,
    build_structure_patches,
    episode_collate,
    episode_loader,
    load_datalist,
    patch_transforms,
    render_patches,
)
from monai_metalearn.engines import MetaTrainer
from monai_metalearn.errors import ConfigError
from monai_metalearn.learners import ProtoNet
from monai_metalearn.networks import ConvEncoder3D

ORGANS = ["liver", "spleen", "stomach", "pancreas", "aorta"]
KEYS = ["image", "label"]
EPISODES = 4  # per epoch
SIZE = (24, 24, 24)

pytestmark = pytest.mark.xdist_group("worker_reproducibility")


@pytest.fixture(scope="module")
def patches(data_dir):
    """5 organs x 4 views of CT-1 at 3 mm: 4 examples per class."""
    items = load_datalist("totalseg_ct1", data_dir)
    return build_structure_patches(items, ORGANS, pixdim=(3, 3, 3), n_views=4, progress=False)


@pytest.fixture(scope="module")
def patch_data(patches):
    """One base dataset with augmentation on (jittered, rescaled crop and the random intensity remap), shared by
    every episodic dataset of the module, as train and validation episodes share their base data in the bundles."""
    return Dataset(patches, transform=patch_transforms(spatial_size=SIZE, modality_augment=True))


def _episodes(data, **kw) -> ClassificationEpisodeDataset:
    return ClassificationEpisodeDataset(data, n_way=3, k_shot=1, q_query=2, num_episodes=EPISODES, seed=3, **kw)


def _drive(loader, dataset, epochs: int = 2) -> list[list[dict]]:
    """The episodes of ``epochs`` epochs, ``set_epoch`` called before each epoch's iteration (as MetaTrainer)."""
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        out.append(list(loader))
    return out


def _assert_same(a: dict, b: dict, where: str) -> None:
    assert a["episode"] == b["episode"], where
    for key in ("classes", "support_subject", "query_subject", "structure"):
        assert a.get(key) == b.get(key), f"{where}: {key}"
    for key in ("support_image", "support_label", "query_image", "query_label"):
        assert torch.equal(a[key], b[key]), f"{where}: {key} of episode {a['episode']}"


def _assert_same_epochs(got: list[list[dict]], ref: list[list[dict]], name: str) -> None:
    expected = [list(range(EPISODES)), list(range(EPISODES, 2 * EPISODES))]
    assert [[ep["episode"] for ep in epoch] for epoch in got] == expected, name
    for e, (g_epoch, r_epoch) in enumerate(zip(got, ref)):
        for g, r in zip(g_epoch, r_epoch):
            _assert_same(g, r, f"{name}, epoch {e}")


@pytest.fixture(scope="module")
def reference(patch_data):
    """Epochs 0 and 1 with ``num_workers=0``."""
    ds = _episodes(patch_data)
    return _drive(DataLoader(ds, batch_size=None, num_workers=0, collate_fn=episode_collate), ds)


def test_reference_epochs_are_new_augmented_episodes(reference, patch_data, patches):
    e0, e1 = reference
    assert [ep["episode"] for ep in e0] == [0, 1, 2, 3] and [ep["episode"] for ep in e1] == [4, 5, 6, 7]
    for a, b in zip(e0, e1):
        assert a["support_image"].shape == (3, 1, *SIZE) and a["query_image"].shape == (6, 1, *SIZE)
        assert not torch.equal(a["query_image"], b["query_image"])  # epoch 1 is not epoch 0 again
    assert len({tuple(ep["classes"]) for ep in e0 + e1}) > 1
    # augmentation is on: one patch read under two seeds gives two different views
    transform = copy.deepcopy(patch_data.transform)
    views = [transform.set_random_state(seed=s)(dict(patches[0]))["image"] for s in (1, 2)]
    assert views[0].shape == (1, *SIZE) and not torch.allclose(views[0], views[1])
    # epoch e serves episodes e*n .. e*n+n-1 of one long list, built from scratch in the main process
    long = ClassificationEpisodeDataset(patch_data, n_way=3, k_shot=1, q_query=2, num_episodes=2 * EPISODES, seed=3)
    for i, ep in enumerate(e1):
        _assert_same(long[EPISODES + i], ep, "long list")


LOADERS = {
    "workers2": lambda ds: DataLoader(ds, batch_size=None, num_workers=2, collate_fn=episode_collate),
    # plain loader: integer indices, the workers read the epoch from the dataset (shared memory)
    "workers2_persistent": lambda ds: DataLoader(
        ds, batch_size=None, num_workers=2, persistent_workers=True, collate_fn=episode_collate
    ),
    # episode_loader: (epoch, index) pairs from EpochIndexSampler
    "episode_loader_workers2_persistent": lambda ds: episode_loader(ds, num_workers=2, persistent_workers=True),
    # two thread workers sharing one dataset object (and one base dataset and transform)
    "thread_loader_thread_workers2": lambda ds: ThreadDataLoader(
        ds, batch_size=None, num_workers=2, use_thread_workers=True, collate_fn=episode_collate
    ),
    "thread_loader_workers2": lambda ds: ThreadDataLoader(
        ds, batch_size=None, num_workers=2, collate_fn=episode_collate
    ),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_loaders_give_the_num_workers_0_episodes(name, patch_data, reference):
    ds = _episodes(patch_data)
    loader = LOADERS[name](ds)
    got = _drive(loader, ds)
    del loader  # shuts persistent workers down
    _assert_same_epochs(got, reference, name)


def test_two_threads_reading_one_dataset_at_once(patch_data, reference):
    """No shared random state: two threads request the 8 episodes of both epochs, in opposite orders, at once."""
    ds = _episodes(patch_data)
    requests = [(e, i) for e in (0, 1) for i in range(EPISODES)]
    barrier = threading.Barrier(2)

    def read(order):
        barrier.wait()
        return {r: ds[r] for r in order}

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(read, [requests, requests[::-1]]))
    for got in results:
        for (e, i), ep in got.items():
            _assert_same(ep, reference[e][i], f"thread read {(e, i)}")
    assert ds.epoch == 0  # (epoch, index) requests leave the dataset's epoch alone


def _record(trainer: MetaTrainer) -> list[dict]:
    seen: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.batch))
    return seen


@pytest.mark.parametrize("loader", ["episode_loader_workers2_persistent", "thread_loader_thread_workers2"])
def test_metatrainer_trains_on_the_num_workers_0_episodes(loader, patch_data, reference):
    torch.manual_seed(0)
    ds = _episodes(patch_data)
    learner = ProtoNet(ConvEncoder3D(in_channels=1, features=(4, 8), pooled_size=1))
    trainer = MetaTrainer("cpu", 2, LOADERS[loader](ds), learner, torch.optim.SGD(learner.parameters(), 0.01))
    seen = _record(trainer)
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"]))
    trainer.run()
    assert trainer.state.epoch == 2 and trainer.state.episode == 2 * EPISODES
    assert ds.epoch == 1 and len(losses) == 2 * EPISODES and all(math.isfinite(x) and x > 0 for x in losses)
    _assert_same_epochs([seen[:EPISODES], seen[EPISODES:]], reference, f"MetaTrainer with {loader}")


# ------------------------------------------------------------------------------------------ segmentation episodes


@pytest.fixture(scope="module")
def subjects(data_dir):
    """CT-1 and the MSD spleen case at 3 mm, cached up to a random Gaussian noise (applied at every read)."""
    items = load_datalist("totalseg_ct1", data_dir) + load_datalist("ivadomed_spleen", data_dir)
    transform = Compose(
        [
            LoadScand(KEYS),
            Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(KEYS, pixdim=(3, 3, 3), mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True),
            RandGaussianNoised("image", prob=1.0, std=0.05),
        ]
    )
    return CacheDataset(items, transform=transform, progress=False)


def _segmentation_episodes(subjects) -> SegmentationEpisodeDataset:
    crop = Compose(
        [
            SpatialPadd(KEYS, spatial_size=(32, 32, 32)),
            RandCropByPosNegLabeld(KEYS, "label", spatial_size=(32, 32, 32), pos=1, neg=1, num_samples=2),
            EnsureTyped(KEYS, track_meta=False),
        ]
    )
    return SegmentationEpisodeDataset(
        subjects, ["spleen"], k_shot=1, q_query=1, num_episodes=EPISODES, episode_transform=crop, seed=5
    )


def test_segmentation_episodes_across_loaders(subjects):
    ds = _segmentation_episodes(subjects)
    ref = _drive(DataLoader(ds, batch_size=None, collate_fn=episode_collate), ds)
    assert ref[0][0]["support_image"].shape == ref[0][0]["query_label"].shape == (2, 1, 32, 32, 32)
    assert {tuple(ep["support_subject"] + ep["query_subject"]) for ep in ref[0] + ref[1]} == {
        ("totalseg_ct1", "msd_spleen_2"), ("msd_spleen_2", "totalseg_ct1")
    }
    assert all(float(ep["support_label"].sum()) > 0 for ep in ref[0] + ref[1])  # pos=1 crops hold spleen voxels
    for a, b in zip(*ref):
        assert not torch.equal(a["support_image"], b["support_image"])
    for name in ("workers2_persistent", "thread_loader_thread_workers2"):
        ds = _segmentation_episodes(subjects)
        loader = LOADERS[name](ds)
        got = _drive(loader, ds)
        del loader
        _assert_same_epochs(got, ref, f"segmentation, {name}")


# ------------------------------------------------------------------------ copies, (epoch, index) pairs, errors


def test_copies_and_spawned_workers_keep_the_episodes(patch_data, reference):
    ds = _episodes(patch_data)
    ds.set_epoch(1)
    for name, other in (("pickle", pickle.loads(pickle.dumps(ds))), ("deepcopy", copy.deepcopy(ds))):
        assert other.epoch == 1 and other._epoch.is_shared(), name
        _assert_same(other[2], reference[1][2], name)
        other.set_epoch(0)  # a copy has an epoch of its own
        assert ds.epoch == 1, name
        _assert_same(other[2], reference[0][2], name)
    # what a spawned worker receives (ForkingPickler): the very same shared epoch
    spawned = pickle.loads(ForkingPickler.dumps(ds))
    ds.set_epoch(0)
    assert spawned.epoch == 0
    ds.set_epoch(1)
    assert spawned.epoch == 1
    _assert_same(spawned[3], reference[1][3], "ForkingPickler")


def test_epoch_index_pairs_and_sampler(patch_data, reference):
    ds = _episodes(patch_data)
    _assert_same(ds[(1, 2)], reference[1][2], "(1, 2)")
    assert ds.epoch == 0 and ds.episode(2, epoch=1).index == 6 and ds.episode(2).index == 2
    sampler = EpochIndexSampler(ds)
    it = iter(sampler)
    ds.set_epoch(1)  # read when iteration starts: the running iteration keeps its epoch
    assert list(it) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert list(sampler) == [(1, 0), (1, 1), (1, 2), (1, 3)] and len(sampler) == EPISODES
    assert isinstance(episode_loader(ds).sampler, EpochIndexSampler)
    assert not isinstance(episode_loader(ds, shuffle=True).sampler, EpochIndexSampler)

    with pytest.raises(ConfigError, match="ClassificationEpisodeDataset: epoch must be a non-negative integer"):
        ds.set_epoch(-1)
    with pytest.raises(ConfigError, match="non-negative integer, got 1.5"):
        ds.set_epoch(1.5)
    assert ds.epoch == 1
    with pytest.raises(IndexError, match="episode 4 out of range 0..3"):
        ds[(0, EPISODES)]
    with pytest.raises(IndexError, match=r"index or an \(epoch, index\) pair, got \(0, 1, 2\)"):
        ds[(0, 1, 2)]
    with pytest.raises(IndexError, match="the epoch must be >= 0"):
        ds[(-1, 0)]
    with pytest.raises(ConfigError, match="EpochIndexSampler needs an episodic dataset with an epoch; got list"):
        EpochIndexSampler([1, 2])


class _LockedShift(Randomizable, MapTransform):
    """A random intensity shift that holds a lock, so that it cannot be deep-copied."""

    def __init__(self, keys) -> None:
        MapTransform.__init__(self, keys)
        self.lock = threading.Lock()
        self.shift = 0.0

    def randomize(self, data=None) -> None:
        self.shift = float(self.R.uniform(-1.0, 1.0))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key] = d[key] + self.shift
        return d


def test_a_transform_that_cannot_be_copied_is_shared_under_a_lock(patches):
    data = Dataset(patches, transform=Compose([patch_transforms(spatial_size=SIZE), _LockedShift("image")]))
    with pytest.raises(TypeError):
        copy.deepcopy(data.transform)
    ds = _episodes(data)
    # MONAI's DataLoader re-seeds what it finds in a dataset (at construction, and in each worker): an episodic
    # dataset stops it there, so thread workers never re-seed the shared transform while another one reads
    before = data.transform.R.get_state()[1].copy()
    loader = DataLoader(ds, batch_size=None, collate_fn=episode_collate)
    assert (data.transform.R.get_state()[1] == before).all() and ds.set_random_state(seed=1) is ds
    ref = _drive(loader, ds)
    shifts = {round(float(ep["support_image"][0].mean()), 3) for ep in ref[0]}
    assert len(shifts) > 1  # the locked transform does shift every example by its own draw
    ds = _episodes(data)
    got = _drive(LOADERS["thread_loader_thread_workers2"](ds), ds)
    _assert_same_epochs(got, ref, "shared transform")


def test_render_patches_leaves_the_transform_alone_and_threads_agree(patches):
    transform = patch_transforms(spatial_size=SIZE)
    before = transform.R.get_state()[1].copy()
    serial = render_patches(patches, transform, seed=4)
    assert (transform.R.get_state()[1] == before).all()
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: render_patches(patches, transform, seed=4), range(2)))
    for rendered in both:
        assert [r["class"] for r in rendered] == [p["class"] for p in patches]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rendered, serial))
    other = render_patches(patches, transform, seed=5)
    assert not torch.equal(other[0]["image"], serial[0]["image"])
