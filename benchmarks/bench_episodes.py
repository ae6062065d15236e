"""Episode throughput: episodes per second of the episodic datasets on the real scans, read from disk or cached.

Two tasks, each over two MONAI datasets and two ``DataLoader`` worker counts:

- ``classification``: 5-way 5-shot 15-query episodes of 32^3 organ patches (100 patches per episode) from the
  real CT-1 and CT-2 (structures present in both, 2 subjects) and the voxelmorph T1 MRI (brain structures with at
  least a few hundred voxels at 2 mm, 1 subject), cropped at 2 mm by ``build_structure_patches``; every example is
  a random jittered patch (``patch_transforms``). ``disk``: a MONAI ``Dataset`` whose transform reads each
  structure crop from a NIfTI file (written once, before timing) with ``LoadScand``, then ``patch_transforms``;
  ``cache``: a ``CacheDataset`` with the same transform (the loaded crops cached in memory).
- ``segmentation``: 1-shot 1-query episodes (liver or spleen) over the whole real CT subjects (CT-1, its 30-slice
  crop, CT-2 (DICOM), the MSD spleen case) at 3 mm, cropped to 96^3 around the structure
  (``SpatialPadd`` + ``RandCropByPosNegLabeld``). ``disk``: ``Dataset`` with the loading transforms (``LoadScand``,
  ``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``) run on every read; ``cache``: ``CacheDataset``.

Each setting is one ``episode_loader`` (``monai.data.DataLoader``) pass over ``warmup + repeats * episodes``
distinct episodes: the first ``--warmup`` episodes (worker start-up included) are not timed, then each of the
``--repeats`` runs of ``--cls-episodes`` / ``--seg-episodes`` episodes is timed back to back (steady state, as within
an epoch); the table reports the median run. Torch uses one thread per process (``OMP_NUM_THREADS=1``), so
``num_workers=2`` uses two worker processes on two cores.

Usage::

    .venv/bin/python benchmarks/bench_episodes.py            # defaults: about 4 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_episodes.py --quick    # smoke run, does not touch the saved results

Writes ``benchmarks/results/episodes.json`` and the table between ``<!-- episodes:start -->`` and
``<!-- episodes:end -->`` in ``benchmarks/README.md`` (``--from-json results/episodes.json`` only redoes the table).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per process

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    median,
    parallel_speedup,
    update_readme_table,
    write_json,
)

CT_SOURCES = ("totalseg_ct1", "totalseg_ct2")
MR_STRUCTURES = (  # voxelmorph T1 structures with >= 250 voxels at 2 mm
    "brainstem", "caudate_left", "caudate_right", "cerebellum_cortex_left", "cerebellum_cortex_right",
    "cerebellum_white_matter_left", "cerebellum_white_matter_right", "hippocampus_left", "hippocampus_right",
    "lateral_ventricle_left", "lateral_ventricle_right", "putamen_left", "putamen_right", "thalamus_left",
    "thalamus_right", "ventral_dc_left", "ventral_dc_right", "pallidum_left", "pallidum_right", "amygdala_left",
    "amygdala_right",
)
SEG_SOURCES = ("totalseg_ct1", "totalseg_ct1_crop", "totalseg_ct2", "ivadomed_spleen")
SEG_STRUCTURES = ("liver", "spleen")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few episodes, 2 repeats, results not saved")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 3, quick 2)")
    p.add_argument("--cls-episodes", type=int, default=None, help="classification episodes per run (default 4)")
    p.add_argument("--seg-episodes", type=int, default=None, help="segmentation episodes per run (default 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first episodes (default 2)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to compare")
    p.add_argument("--tasks", nargs="+", default=["classification", "segmentation"])
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/episodes.json)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--from-json", type=Path, default=None, help="only regenerate the README table from this JSON")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.warmup = 2 if args.warmup is None else args.warmup
    args.cls_episodes = args.cls_episodes or (2 if args.quick else 4)
    args.seg_episodes = args.seg_episodes or (2 if args.quick else 8)
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR / "episodes.json"
    return args


# ---------------------------------------------------------------------------------------------------- datasets


def classification_items(workdir: Path) -> tuple[list[dict], dict[str, Any]]:
    """Structure crops of the real scans written to NIfTI once; one datalist item per (crop, view)."""
    import nibabel as nib
    import numpy as np

    from monai_metalearn.data import build_structure_patches, load_datalist

    ct = [item for name in CT_SOURCES for item in load_datalist(name)]
    common = sorted(set.intersection(*(set(item["structures"]) for item in ct)))
    t0 = time.perf_counter()
    patches = build_structure_patches(ct, common, pixdim=(2, 2, 2), n_views=1, progress=False)
    patches += build_structure_patches(
        load_datalist("voxelmorph_t1"), MR_STRUCTURES, pixdim=(2, 2, 2), n_views=1, progress=False
    )
    crop_s = time.perf_counter() - t0
    subjects_per_class: dict[str, set] = {}
    for p in patches:
        subjects_per_class.setdefault(p["class"], set()).add(p["subject"])
    items, nbytes = [], 0
    for i, p in enumerate(patches):
        paths = {}
        for key, dtype in (("image", np.float32), ("label", p["label"].numpy().dtype)):
            array = p[key][0].numpy().astype(dtype)
            nbytes += array.nbytes
            paths[key] = str(workdir / f"crop{i:03d}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(array, p[key].affine.numpy()), paths[key])
        # 20 examples per class (5 shots + 15 queries): views split over the class's subjects
        views = 20 // len(subjects_per_class[p["class"]])
        for view in range(views):
            items.append(
                {**paths, "class": p["class"], "structure_id": p["structure_id"], "subject": p["subject"], "view": view}
            )
    info = {
        "classes": len(subjects_per_class),
        "ct_classes": len(common),
        "mr_classes": len(MR_STRUCTURES),
        "crops": len(patches),
        "items": len(items),
        "crop_megabytes": round(nbytes / 2**20, 1),
        "build_patches_s": round(crop_s, 2),
    }
    return items, info


def classification_transform():
    from monai.transforms import Compose

    from monai_metalearn.data import LoadScand, patch_transforms

    return Compose([LoadScand(keys=["image", "label"]), *patch_transforms(spatial_size=(32, 32, 32)).transforms])


def segmentation_items() -> list[dict]:
    from monai_metalearn.data import load_datalist

    return [item for name in SEG_SOURCES for item in load_datalist(name)]


def segmentation_transforms(size=(96, 96, 96)):
    from monai.transforms import (
        Compose,
        EnsureTyped,
        Orientationd,
        RandCropByPosNegLabeld,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    from monai_metalearn.data import LoadScand

    keys = ["image", "label"]
    load = Compose(
        [
            LoadScand(keys),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=(3, 3, 3), mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", a_min=-200, a_max=300, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    crop = Compose(
        [
            SpatialPadd(keys, spatial_size=size),
            RandCropByPosNegLabeld(keys, "label", spatial_size=size, pos=1, neg=0, num_samples=1),
            EnsureTyped(keys, track_meta=False),
        ]
    )
    return load, crop


def make_base(kind: str, items: list[dict], transform) -> tuple[Any, float]:
    from monai.data import CacheDataset, Dataset

    t0 = time.perf_counter()
    if kind == "disk":
        base = Dataset(items, transform=transform)
    else:
        base = CacheDataset(items, transform=transform, num_workers=None, progress=False)
    return base, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------- timing


def time_runs(make_episodes, num_workers: int, n: int, repeats: int, warmup: int) -> tuple[list[float], float]:
    """Episodes per second of ``repeats`` consecutive runs of ``n`` episodes, after ``warmup`` untimed episodes.

    One ``episode_loader`` pass over ``warmup + repeats * n`` distinct episodes: worker start-up falls in the
    warm-up, and each run is timed from the arrival of its previous episode to the arrival of its last one, so
    the workers stay busy (steady state, as within a training epoch). Workers deliver their episodes in lock-step,
    so ``warmup`` and ``n`` should be multiples of ``num_workers``. Also returns the time to the first episode
    (worker start-up included).
    """
    from monai_metalearn.data import episode_loader

    episodes = make_episodes(warmup + repeats * n)
    t0 = time.perf_counter()
    stamps = []
    for ep in episode_loader(episodes, num_workers=num_workers):
        assert ep["support_image"].shape[0] > 0
        stamps.append(time.perf_counter())
    rates = []
    for r in range(repeats):
        first, last = warmup + r * n, warmup + (r + 1) * n - 1
        start = stamps[first - 1] if first > 0 else t0
        rates.append(n / (stamps[last] - start))
    return rates, stamps[0] - t0


def bench_task(task: str, args, workdir: Path) -> tuple[list[dict], dict]:
    from monai_metalearn.data import ClassificationEpisodeDataset, SegmentationEpisodeDataset

    if task == "classification":
        items, info = classification_items(workdir)
        transform = classification_transform()
        n_episodes = args.cls_episodes

        def episodes_over(base, n):
            return ClassificationEpisodeDataset(base, n_way=5, k_shot=5, q_query=15, num_episodes=n, seed=0)

        info.update(n_way=5, k_shot=5, q_query=15, patch=[32, 32, 32], pixdim=[2, 2, 2])
    elif task == "segmentation":
        items = segmentation_items()
        transform, crop = segmentation_transforms()
        n_episodes = args.seg_episodes

        def episodes_over(base, n):
            return SegmentationEpisodeDataset(
                base, SEG_STRUCTURES, k_shot=1, q_query=1, num_episodes=n, episode_transform=crop, seed=0
            )

        info = {
            "structures": list(SEG_STRUCTURES),
            "sources": list(SEG_SOURCES),
            "subjects": len({item["subject"] for item in items}),
            "k_shot": 1,
            "q_query": 1,
            "crop": [96, 96, 96],
            "pixdim": [3, 3, 3],
        }
    else:
        raise ValueError(f"unknown task {task!r}")
    info["episodes_per_run"] = n_episodes
    results = []
    for kind in ("disk", "cache"):
        base, build_s = make_base(kind, items, transform)
        info[f"{kind}_dataset_build_s"] = round(build_s, 2)
        for nw in args.workers:
            rates, first_s = time_runs(
                lambda n: episodes_over(base, n), nw, n_episodes, args.repeats, args.warmup
            )
            results.append(
                {
                    "task": task,
                    "dataset": "Dataset (disk)" if kind == "disk" else "CacheDataset",
                    "num_workers": nw,
                    "episodes_per_s_median": round(median(rates), 3),
                    "runs": [round(r, 3) for r in rates],
                    "first_episode_s": round(first_s, 2),
                }
            )
            print(f"{task:15s} {kind:5s} workers={nw}: {median(rates):7.3f} episodes/s  runs {results[-1]['runs']}")
        del base
    return results, info


# ----------------------------------------------------------------------------------------------------- report


def markdown_table(out: dict) -> str:
    cfg, machine = out["config"], out["machine"]
    lines = [
        "| task | dataset | num_workers | episodes/s (median) | s/episode | runs (episodes/s) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in out["results"]:
        rate = r["episodes_per_s_median"]
        runs = ", ".join(f"{v:.2f}" for v in r["runs"])
        lines.append(
            f"| {r['task']} | {r['dataset']} | {r['num_workers']} | {rate:.2f} | {1 / rate:.2f} | {runs} |"
        )
    cls, seg = cfg["tasks"].get("classification"), cfg["tasks"].get("segmentation")
    notes = []
    if cls:
        notes.append(
            f"classification: {cls['n_way']}-way {cls['k_shot']}-shot {cls['q_query']}-query, 32^3 patches, "
            f"{cls['classes']} classes ({cls['ct_classes']} CT from 2 subjects, {cls['mr_classes']} MR from 1), "
            f"{cls['episodes_per_run']} episodes per run"
        )
    if seg:
        notes.append(
            f"segmentation: {seg['k_shot']}-shot {seg['q_query']}-query {'/'.join(seg['structures'])}, 96^3 crops at "
            f"3 mm, {seg['subjects']} subjects, {seg['episodes_per_run']} episodes per run"
        )
    notes.append(
        f"median of {cfg['repeats']} runs after {cfg['warmup']} warm-up episode(s); {machine['cpus_usable']} usable "
        f"CPUs ({machine['cpu_model']}), torch {machine['torch']}, MONAI {machine['monai']}, "
        f"{machine['torch_threads']} torch thread(s) per process; measured {out['date']}"
    )
    before, after = machine["parallel_speedup_2_processes"]
    notes.append(
        f"two busy processes ran {before:.2f}x / {after:.2f}x as fast as one (before / after the benchmark; ideal 2x): "
        "the bound on what num_workers=2 can gain on this shared machine"
    )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json is not None:
        out = json.loads(args.from_json.read_text())
        print("updated", update_readme_table("episodes", markdown_table(out)))
        return out
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    speedup = [parallel_speedup(2)]
    results, tasks = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_episodes_") as tmp:
        for task in args.tasks:
            res, info = bench_task(task, args, Path(tmp))
            results += res
            tasks[task] = info
    speedup.append(parallel_speedup(2))
    out = {
        "benchmark": "episodes",
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "num_workers": args.workers,
            "timing": (
                "one episode_loader pass per setting over warmup + repeats * episodes distinct episodes; warm-up "
                "(worker start-up) untimed, runs timed back to back; first_episode_s includes worker start-up"
            ),
            "tasks": tasks,
        },
        "results": results,
        "machine": {**machine_info(), "parallel_speedup_2_processes": speedup},
        "total_s": None,
    }
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {out['total_s']} s")
    if args.out is not None:
        print("wrote", write_json(args.out, out))
    print(markdown_table(out))
    if not args.quick and not args.no_readme:
        print("updated", update_readme_table("episodes", markdown_table(out)))
    return out


if __name__ == "__main__":
    main()
