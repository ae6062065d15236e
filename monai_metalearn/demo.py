"""``make demo``: the product's headline on real scans, and the classification demo.

``python -m monai_metalearn.demo`` (the default, ``--task segmentation``): a held-out organ segmented in held-out BTCV
subjects from ONE labelled subject. The four test organs (liver, spleen, left and right kidney) in the first
``n_queries`` test subjects of fold 0 of the segmentation bundle's folds, each from the next test subject
(``next_subjects``), by

* ``atlas``: registration of the labelled subject to the new one, mask carried (``AtlasSegmenter``);
* ``atlas_em``: the hybrid, the carried mask as prior of an intensity model learned on the new scan;
* ``protoseg``: the meta-learned prototype segmenter, meta-trained here briefly on the nine other BTCV organs of
  fold 0's training subjects (setting 2: the test organs' voxels ignored);
* the whole-body and box-aligned references.

It prints Dice per method as mean ± 95% CI over query subjects [number of subjects] and writes ``results.json`` and an
overlay image to ``output_dir``. About 6 minutes on 2 CPU cores (the first run also reads and caches the scans).

``--task classification``: meta-trains few-shot classifiers through the ``fewshot_classification_3d`` bundle and
evaluates 5-way 1- and 5-shot episodes on held-out structures.

Usage::

    python -m monai_metalearn.demo                                   # the segmentation headline
    python -m monai_metalearn.demo --n_queries 10
    python -m monai_metalearn.demo --task classification --methods finetune,protonet
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

__all__ = ["bundle_dir", "run_method", "classification", "segmentation", "main"]

DEFAULT_METHODS = ("finetune", "protonet")


def bundle_dir(name: str = "fewshot_classification_3d") -> Path:
    """The bundle folder of a source checkout (``<repo>/bundles/<name>``)."""
    root = Path(__file__).resolve().parents[1] / "bundles" / name
    if not (root / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"bundle {name!r} not found at {root} (run from a source checkout)")
    return root


def _workflow(configs: list[str], **override: Any):
    from monai.bundle import ConfigWorkflow

    root = bundle_dir()
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / c) for c in configs],
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=None,
        bundle_root=str(root),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def run_method(
    method: str, output_dir: Path, epochs: int, episodes_per_epoch: int, test_episodes: int, progress: bool
) -> dict[str, Any]:
    """Trains and evaluates one method through the bundle; returns its ``metrics.json`` plus the train time."""
    out = output_dir / method
    common = dict(
        learner_name=method,
        output_dir=str(out),
        ckpt_path=str(out / "model.pt"),
        cache_dir=str(output_dir / "cache"),
        progress=progress,
    )
    t0 = time.perf_counter()
    _workflow(["train.json"], epochs=epochs, episodes_per_epoch=episodes_per_epoch, **common)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _workflow(["train.json", "evaluate.json"], test_episodes=test_episodes, **common)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["train_seconds"] = round(train_s, 1)
    metrics["evaluate_seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def _cell(summary: dict[str, Any]) -> str:
    acc = summary["accuracy"]
    return f"{100 * acc['mean']:5.1f} ± {100 * acc['ci95']:4.1f}"


def classification(
    methods: str | tuple[str, ...] = DEFAULT_METHODS,
    epochs: int = 2,
    episodes_per_epoch: int = 15,
    test_episodes: int = 100,
    output_dir: str = "outputs/demo",
    progress: bool = False,
) -> dict[str, Any]:
    """Meta-trains each method briefly, evaluates 5-way 1/5-shot on the held-out CT structures, prints a table.

    Args:
        methods: comma-separated learner names (``finetune, protonet, maml, fomaml, anil, metasgd, reptile``).
        epochs, episodes_per_epoch: meta-training length per method (the bundle's defaults are 5 x 40).
        test_episodes: evaluation episodes per shot setting.
        output_dir: checkpoints, metrics, TensorBoard logs and the patch cache.
        progress: progress bars.
    """
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not os.environ.get("MONAI_DATA_DIRECTORY"):
        raise ValueError("set MONAI_DATA_DIRECTORY to the data folder (make demo does)")
    out = Path(output_dir).resolve()
    train_cfg = json.loads((bundle_dir() / "configs" / "train.json").read_text())
    print(
        f"monai-metalearn demo: data {os.environ['MONAI_DATA_DIRECTORY']}\n"
        f"  meta-train {len(train_cfg['train_classes'])} classes (real CT, real T1 MRI, and brain structures with "
        f"SYNTHETIC images from the 20 real SynthSeg label maps)\n"
        f"  meta-val {len(train_cfg['val_classes'])} classes; meta-test {len(train_cfg['test_classes'])} real CT "
        f"structures: {', '.join(train_cfg['test_classes'])}\n"
        f"  test episodes: support from one CT, query from the other (cross-subject; 2 subjects behind the test "
        f"classes)\n  methods: {', '.join(methods)}; {epochs} x {episodes_per_epoch} meta-iterations each\n",
        flush=True,
    )
    results: dict[str, Any] = {}
    for method in methods:
        print(f"[{method}] meta-training and evaluating ...", flush=True)
        results[method] = run_method(method, out, epochs, episodes_per_epoch, test_episodes, progress)
        r = results[method]
        print(f"[{method}] 1-shot {_cell(r['by_shot']['1'])}  5-shot {_cell(r['by_shot']['5'])}  "
              f"(train {r['train_seconds']:.0f} s)", flush=True)
    header = f"| {'method':10} | 5-way 1-shot acc. % (95% CI) | 5-way 5-shot acc. % (95% CI) | train s |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for method, r in results.items():
        lines.append(
            f"| {method:10} | {_cell(r['by_shot']['1']):>28} | {_cell(r['by_shot']['5']):>28} | "
            f"{r['train_seconds']:7.0f} |"
        )
    table = "\n".join(lines)
    print(f"\nHeld-out CT structures, {test_episodes} episodes per setting (chance 20%):\n{table}\n", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")
    return results


ORGAN_COLORS = {"liver": "tab:red", "spleen": "tab:blue", "kidney_left": "tab:green", "kidney_right": "tab:orange"}
SEGMENTATION_METHODS = ("atlas", "atlas_em", "protoseg", "boxaligned", "wholebody")


def _overlay(path: Path, query: dict, predictions: dict, methods: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from monai_metalearn.apps.pairs import subject_mask

    def axial(v, z):  # RAS [1, x, y, z] -> radiological axial view
        return np.asarray(v[0].detach().cpu() if hasattr(v, "detach") else v[0])[::-1, ::-1, z].T

    liver = subject_mask(query, "liver")
    z = int((liver[0] != 0).sum(axis=(0, 1)).argmax())
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(3.6 * (len(methods) + 1), 3.8))
    for ax, method in zip(axes, ("reference", *methods)):
        ax.imshow(axial(query["image"], z), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for organ, color in ORGAN_COLORS.items():
            mask = subject_mask(query, organ) if method == "reference" else predictions.get((method, organ))
            if mask is None:
                continue
            m = axial(mask, z).astype(float)
            if m.any():
                ax.contour(m, levels=[0.5], colors=[color], linewidths=1.2)
        ax.set_title(method, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def segmentation(
    n_queries: int = 5,
    output_dir: str = "outputs/demo",
    methods: str | tuple[str, ...] = SEGMENTATION_METHODS,
    train_epochs: int = 4,
    train_episodes: int = 12,
    threads: int = 2,
) -> dict[str, Any]:
    """The headline: a held-out organ in held-out BTCV subjects from one labelled subject (see the module docstring).

    Args:
        n_queries: query subjects (fold 0's BTCV test subjects, in order; at most 10).
        output_dir: ``results.json``, ``overlay.png`` and the subject cache.
        methods: any of ``atlas, atlas_em, protoseg, boxaligned, wholebody``.
        train_epochs, train_episodes: protoseg's short meta-training.
        threads: torch threads.
    """
    import torch

    from monai_metalearn.apps.pairs import next_subjects, pair_dice, quick_meta_train, segment_pair, subject_mask
    from monai_metalearn.apps.protocols import ABDOMINAL_TEST_ORGANS, BTCV_TRAIN_ORGANS, ignored_structures
    from monai_metalearn.apps.segmentation import fold_train_subjects, load_segmentation_subjects
    from monai_metalearn.learners import create_segmentation_learner
    from monai_metalearn.metrics import mean_ci95_subjects

    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(SEGMENTATION_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {SEGMENTATION_METHODS}")
    data = os.environ.get("MONAI_DATA_DIRECTORY")
    if not data:
        raise ValueError("set MONAI_DATA_DIRECTORY to the data folder (make demo does)")
    torch.set_num_threads(max(1, int(threads)))
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((bundle_dir("fewshot_segmentation_3d") / "configs" / "train.json").read_text())
    organs = list(ABDOMINAL_TEST_ORGANS)
    t_start = time.perf_counter()
    subjects = load_segmentation_subjects(data, ["btcv_sabs"], organs + list(BTCV_TRAIN_ORGANS), cfg["pixdim"],
                                          progress=False, cache_dir=out / "cache")
    by_id = {s["subject"]: s for s in subjects}
    test_ids = sorted(cfg["folds"]["btcv_sabs"][0])
    queries = test_ids[: max(1, min(int(n_queries), len(test_ids)))]
    print(f"monai-metalearn demo: {len(subjects)} BTCV CTs (8-bit windowed, scaled per image) from {data}\n"
          f"  held-out organs {', '.join(organs)}; query subjects {', '.join(queries)} (fold 0 test subjects), each "
          f"from the next test subject's labels (1-shot)\n  methods: {', '.join(methods)}", flush=True)
    learners: dict[str, Any] = {m: create_segmentation_learner(m) for m in methods if m != "protoseg"}
    if "atlas_em" in learners and "atlas" in learners:  # one registration per pair serves both
        learners["atlas_em"]._cache = learners["atlas"]._cache
    if "protoseg" in methods:
        t0 = time.perf_counter()
        train_ids = set(fold_train_subjects(subjects, cfg["folds"], 0, ["btcv_sabs"]))
        learners["protoseg"], _ = quick_meta_train(
            [s for s in subjects if s["subject"] in train_ids], list(BTCV_TRAIN_ORGANS),
            ignored_structures(2, organs), epochs=train_epochs, episodes_per_epoch=train_episodes,
            learner_defaults=cfg["learner_defaults"])
        print(f"  protoseg meta-trained on {len(train_ids)} training subjects, {train_epochs * train_episodes} "
              f"episodes, in {time.perf_counter() - t0:.0f} s", flush=True)
    dice: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    first_predictions: dict = {}
    for qi, query in enumerate(queries):
        support = by_id[next_subjects(query, test_ids, 1)[0]]
        t0 = time.perf_counter()
        for m in methods:
            for organ in organs:
                if organ not in support["structures"] or organ not in by_id[query]["structures"]:
                    continue
                pred = segment_pair(learners[m], support, by_id[query], organ)
                dice[m].setdefault(query, {})[organ] = pair_dice(pred, subject_mask(by_id[query], organ))
                if qi == 0:
                    first_predictions[m, organ] = pred
        print(f"  {support['subject']} -> {query}: " + ", ".join(
            f"{m} {sum(dice[m][query].values()) / len(dice[m][query]):.2f}" for m in methods)
            + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    def cell(values: list[float], subs: list[str]) -> str:
        r = mean_ci95_subjects(values, subs)
        ci = "" if r["ci95"] is None else f" ± {100 * r['ci95']:.1f}"
        return f"{100 * r['mean']:.1f}{ci} [{r['n_subjects']}]"

    header = "| method | mean of 4 organs | " + " | ".join(organs) + " |"
    lines = [header, "|---|" + "---:|" * (len(organs) + 1)]
    summary = {}
    for m in methods:
        subs = sorted(dice[m])
        means = [sum(dice[m][s].values()) / len(dice[m][s]) for s in subs]
        row = [cell(means, subs)]
        for organ in organs:
            pairs = [(dice[m][s][organ], s) for s in subs if organ in dice[m][s]]
            row.append(cell(*map(list, zip(*pairs))) if pairs else "n/a")
        summary[m] = mean_ci95_subjects(means, subs)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    overlay = out / "overlay.png"
    _overlay(overlay, by_id[queries[0]], first_predictions, methods,
             f"{queries[0]} from {next_subjects(queries[0], test_ids, 1)[0]}'s labels (1-shot); reference on the left")
    print(f"\n1-shot Dice %, mean ± 95% CI over query subjects [subjects]:\n{table}\n\n"
          "atlas / atlas_em: registration-based (nothing trained); protoseg: a short meta-training (the bundle trains "
          "longer; benchmarks/README.md); boxaligned / wholebody: the trivial references.\n"
          f"overlay: {overlay}\nresults: {out / 'results.json'} ({time.perf_counter() - t_start:.0f} s in all)",
          flush=True)
    results = {"queries": queries, "organs": organs, "dice": dice, "summary": summary, "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(task: str = "segmentation", **kwargs: Any) -> dict[str, Any]:
    """``task="segmentation"`` (:func:`segmentation`, the default) or ``"classification"`` (:func:`classification`)."""
    if task == "segmentation":
        return segmentation(**kwargs)
    if task == "classification":
        return classification(**kwargs)
    raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")


if __name__ == "__main__":
    import fire

    from monai_metalearn.errors import MetaLearnError

    logging.getLogger("ignite").setLevel(logging.WARNING)
    def cli(**kwargs: Any) -> None:
        try:
            main(**kwargs)
        except (MetaLearnError, ValueError, FileNotFoundError, KeyError) as err:
            raise SystemExit(f"monai-metalearn: error: {err}") from None

    cli.__doc__ = main.__doc__
    fire.Fire(cli)
