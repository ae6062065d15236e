"""Few-shot diagnosis of ACDC patients (5 groups: DCM, HCM, MINF, NOR, RV): 5-way 1-shot and 5-shot, patient-level.

Every patient is one case whose end-diastolic and end-systolic cine frames are the two channels of one image
(``monai_metalearn.diagnosis.acdc_cases``). Three-fold cross-validation over patients, stratified by diagnosis (10
patients per fold, 2 per group): the image learners are meta-trained on the other 20 patients only (5-way 1-shot
episodes, ``MetaTrainer``); evaluation episodes query the fold's test patients, one per diagnosis, with K support
patients per diagnosis drawn from every other patient (the confirmed cases). Every method sees the same episodes.

Methods:

* ``biomarkers_centroid`` / ``biomarkers_logistic``: the clinical indices (LV / RV / myocardium volumes at ED and ES,
  ejection fractions, mass and ratios) from the ground-truth masks, classified on the support alone;
* ``biomarkers_atlas_centroid`` / ``_logistic``: the same indices, but the *query* patient's masks are produced by
  the project's own 1-shot segmenter (``AtlasSegmenter``: the ED and ES masks of a patient of another diagnosis,
  ``ATLAS_OFFSET``, registered onto the query's frames, 1.5 x 1.5 x 3 mm); the support cases keep their given masks (confirmed cases come with them). A
  query whose predicted masks miss a structure counts as wrong;
* ``biomarkers_multiatlas_*``: the query's masks fused from 4 atlases (``ATLAS_OFFSETS``: one patient of each other
  diagnosis) by locally weighted voting;
* ``biomarkers_selfseg_*`` / ``biomarkers_multiselfseg_*``: the support cases' indices also come from their own
  registered masks (1 or 4 atlases), as when confirmed cases arrive without masks; a support case whose masks lose
  a structure is left out of the support;
* ``protonet``, ``matching``: image-only learners on a small 3D CNN, meta-trained on the fold's training patients;
* ``protonet_untrained``: the same encoder at its initial weights (what meta-training adds);
* chance: 20%.

Accuracy: per query patient (mean over the episodes that queried it), then mean ± 95% t-interval over the 30
patients; per-class accuracy and the confusion matrix over all queries. Writes ``results/diagnosis.json`` and the
README table (marker ``diagnosis``).

Usage::

    python benchmarks/bench_diagnosis.py                    # every method, 3 folds
    python benchmarks/bench_diagnosis.py --methods biomarkers_centroid,biomarkers_logistic
    python benchmarks/bench_diagnosis.py --atlas_only --atlas_count 4 --atlas_part 0/2   # masks first, 2 processes
    python benchmarks/bench_diagnosis.py --methods biomarkers_multiatlas_logistic --merge
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, update_readme_table, write_json  # noqa: E402

MARKER = "diagnosis"
METHODS = ("biomarkers_centroid", "biomarkers_logistic", "biomarkers_atlas_centroid", "biomarkers_atlas_logistic",
           "biomarkers_selfseg_centroid", "biomarkers_selfseg_logistic", "biomarkers_multiatlas_centroid",
           "biomarkers_multiatlas_logistic", "biomarkers_multiselfseg_centroid", "biomarkers_multiselfseg_logistic",
           "protonet", "matching", "protonet_untrained")
#: where the masks of the self-segmenting methods come from: method part -> (number of atlases, support masks given)
MASK_SOURCES = {"atlas": (1, True), "selfseg": (1, False), "multiatlas": (4, True), "multiselfseg": (4, False)}


def mask_source(method: str) -> tuple[int, bool] | None:
    """``(atlases, support masks given)`` of a ``biomarkers_<source>_<classifier>`` method; None for true masks."""
    parts = method.split("_")
    return MASK_SOURCES.get(parts[1]) if len(parts) == 3 else None
HEART = ("right_ventricle", "myocardium", "left_ventricle")
IMAGE_METHODS = ("protonet", "matching", "protonet_untrained")


def encoder():
    from monai_metalearn.networks import ConvEncoder3D

    return ConvEncoder3D(in_channels=2, features=(16, 32, 64, 64), pooled_size=2)


def meta_train(name: str, cases: list[dict], epochs: int, episodes: int, seed: int, lr: float = 1e-3):
    """A learner meta-trained on 5-way 1-shot episodes of ``cases`` (the fold's training patients)."""
    from monai_metalearn.data import ClassificationEpisodeDataset, episode_loader
    from monai_metalearn.engines import MetaTrainer
    from monai_metalearn.learners import create_learner

    torch.manual_seed(seed)
    enc = encoder()
    feature_dim = int(enc(torch.zeros(1, *cases[0]["image"].shape)).shape[1])
    learner = create_learner(name.replace("_untrained", ""), enc, feature_dim, n_way=5)
    if name.endswith("_untrained") or epochs == 0:
        return learner.eval()
    data = ClassificationEpisodeDataset(cases, n_way=5, k_shot=1, q_query=1, num_episodes=episodes,
                                        cross_subject=True, seed=seed)
    trainer = MetaTrainer(device="cpu", max_epochs=epochs, train_data_loader=episode_loader(data, meta_batch_size=4),
                          learner=learner, optimizer=torch.optim.Adam(learner.parameters(), lr=lr))
    trainer.run()
    return learner.eval()


def biomarker_features(cases_raw: list[dict]):
    from monai_metalearn.diagnosis.biomarkers import BIOMARKER_NAMES, biomarker_matrix, biomarkers_from_files

    return biomarker_matrix([biomarkers_from_files(*c["label"]) for c in cases_raw]), list(BIOMARKER_NAMES)


ATLAS_WORK = Path(__file__).resolve().parent / "_work" / "diagnosis_atlas"
#: the atlases of a patient are the 6th, 12th, 18th and 24th patients after it in sorted order (the first one alone
#: for 1 atlas): the shared ACDC ids come in groups of 6 per diagnosis, so no atlas is of the query's diagnosis (a
#: carried mask that registration fails to deform then pulls the indices towards another condition: a pessimistic
#: choice, never an optimistic one); 4 atlases are one of each other diagnosis
ATLAS_OFFSETS = (6, 12, 18, 24)
ATLAS_OFFSET = ATLAS_OFFSETS[0]


def _atlas_work(count: int) -> Path:
    return ATLAS_WORK if count == 1 else ATLAS_WORK.with_name(f"diagnosis_atlas{count}")


def atlas_biomarkers(raw: list[dict], compute: bool = True, part: tuple[int, int] = (0, 1), count: int = 1):
    """Per patient, biomarkers from masks that ``AtlasSegmenter`` carries from another patient (``ATLAS_OFFSET``): one
    registration per (atlas, query, phase) carries the three structures; ``None`` where a structure came out empty.
    Each patient's result is kept in ``_work/diagnosis_atlas/<id>.json`` (a re-run skips it; ``compute=False`` only
    reads what is there; ``part=(i, n)`` computes every n-th missing patient from the i-th, so n processes share
    the work). ``count`` > 1: that many atlases (``ATLAS_OFFSETS``), fused by locally weighted voting (the bundle's
    ``multiatlas``), kept in ``_work/diagnosis_atlas<count>/``."""
    from monai_metalearn.apps.pairs import next_subjects, pair_dice, segment_pair, subject_mask
    from monai_metalearn.apps.segmentation import load_segmentation_subjects
    from monai_metalearn.diagnosis.biomarkers import BIOMARKER_NAMES, cardiac_biomarkers
    from monai_metalearn.learners import AtlasSegmenter

    work = _atlas_work(count)
    work.mkdir(parents=True, exist_ok=True)
    pixdim = (1.5, 1.5, 3.0)
    todo = [c for c in raw if not (work / f"{c['id']}.json").is_file()] if compute else []
    todo = todo[part[0]::part[1]]
    if todo:
        ids = sorted({c["subject"] for c in raw})
        def atlases_of(q):
            return [next_subjects(q, ids, k)[-1] for k in ATLAS_OFFSETS[:count]]

        need = sorted({c["subject"] for c in todo} | {a for c in todo for a in atlases_of(c["subject"])})
        subjects = load_segmentation_subjects(os.environ["MONAI_DATA_DIRECTORY"], ["acdc"], list(HEART), pixdim,
                                              progress=False, source_options={"acdc": {"phases": ["ED", "ES"]}},
                                              subjects=need)
        by = {(s["subject"], s["phase"]): s for s in subjects}
        atlas = AtlasSegmenter(fusion="majority" if count == 1 else "weighted")
        for c in todo:
            q = c["subject"]
            a = atlases_of(q)
            labels, dice, seconds = {}, [], []
            for phase in ("ED", "ES"):
                t0 = time.perf_counter()
                lab = torch.zeros_like(by[q, phase]["label"][0], dtype=torch.int16)
                for value, structure in enumerate(HEART, start=1):
                    m = segment_pair(atlas, [by[x, phase] for x in a], by[q, phase], structure)
                    dice.append(pair_dice(m, subject_mask(by[q, phase], structure)))
                    lab[(m[0] > 0) & (lab == 0)] = value
                labels[phase] = lab.numpy()
                seconds.append(time.perf_counter() - t0)
            try:
                f = cardiac_biomarkers(labels["ED"], labels["ES"], spacing=pixdim)
                row, error = [f[n] for n in BIOMARKER_NAMES], None
            except ValueError as err:
                row, error = None, str(err)
            rec = {"atlas": a[0] if count == 1 else a, "features": row, "error": error, "dice": dice,
                   "seconds": seconds}
            (work / f"{c['id']}.json").write_text(json.dumps(rec))
            print(f"{c['id']} from {a}: mask Dice {np.mean(dice):.2f}" + (f"; no biomarkers ({error})" if error else ""),
                  flush=True)
    recs = {c["id"]: json.loads((work / f"{c['id']}.json").read_text()) for c in raw
            if (work / f"{c['id']}.json").is_file()}
    dice = [d for r in recs.values() for d in r["dice"]]
    info = {"atlases": count, "patients": len(recs), "mask_dice_mean": float(np.mean(dice)) if dice else None,
            "seconds_per_registration" if count == 1 else "seconds_per_phase": float(np.median([t for r in recs.values() for t in r["seconds"]])) if recs else None,
            "failed": sorted(k for k, r in recs.items() if r["features"] is None)}
    return {k: r["features"] for k, r in recs.items()}, info


def run(methods, shots, n_folds, n_episodes, epochs, train_episodes, seed):
    from monai_metalearn.diagnosis import ACDC_DIAGNOSES, acdc_cases, load_cases
    from monai_metalearn.diagnosis.biomarkers import BiomarkerClassifier
    from monai_metalearn.diagnosis.episodes import episode_tensors, patient_episodes, patient_accuracy_summary
    from monai_metalearn.diagnosis.episodes import stratified_patient_folds

    torch.set_num_threads(2)
    raw = acdc_cases()
    t0 = time.perf_counter()
    cases = load_cases(raw) if set(methods) & set(IMAGE_METHODS) else raw
    print(f"{len(raw)} ACDC patients loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    classes = [c["class"] for c in raw]
    patients = [c["id"] for c in raw]
    names = list(ACDC_DIAGNOSES)
    feats = biomarker_features(raw)[0] if any(m.startswith("biomarkers") for m in methods) else None
    counts = sorted({mask_source(m)[0] for m in methods if mask_source(m)})
    by_count = {n: atlas_biomarkers(raw, compute=False, count=n) for n in counts}
    folds = stratified_patient_folds(classes, n_folds)
    records = {(m, k): [] for m in methods for k in shots}
    train_seconds: dict[str, list[float]] = {m: [] for m in methods}
    for f, test in enumerate(folds):
        train = [cases[i] for i in range(len(cases)) if i not in set(test)]
        for m in methods:
            t0 = time.perf_counter()
            learner = (meta_train(m, train, epochs, train_episodes, seed + f) if m in IMAGE_METHODS else None)
            train_seconds[m].append(time.perf_counter() - t0)
            for k in shots:
                eps = patient_episodes(classes, test, k, n_episodes, seed=seed + 1000 * f + k)
                for ep in eps:
                    if learner is not None:
                        sx, sy, qx, _ = episode_tensors(cases, ep)
                        with torch.no_grad():
                            pred = learner.adapt(sx, sy)(qx).argmax(1).tolist()
                    else:
                        clf = BiomarkerClassifier(method=m.rsplit("_", 1)[1])
                        source = mask_source(m)
                        atlas_rows = by_count[source[0]][0] if source else None
                        if source and not source[1]:  # every case's indices from its own atlas masks, support too
                            sup = [(atlas_rows.get(patients[i]), y) for i, y in zip(ep["support"], ep["support_labels"])]
                            sup = [(r, y) for r, y in sup if isinstance(r, list)]  # a support case lost: left out
                            clf.fit(np.asarray([r for r, _ in sup]), [y for _, y in sup])
                        else:
                            clf.fit(feats[ep["support"]], ep["support_labels"])
                        if source:  # the query's indices from its predicted masks; a failed mask is wrong;
                            # queries whose atlas masks were not computed (``--atlas_only`` stopped early) are left out
                            rows = [atlas_rows.get(patients[q], "absent") for q in ep["query"]]
                            pred = [-2 if isinstance(r, str) else (-1 if r is None else
                                    int(clf.predict(np.asarray([r]))[0])) for r in rows]
                            pred = [p if p != -1 else (t + 1) % len(names) for p, t in zip(pred, ep["query_labels"])]
                        else:
                            pred = [int(p) for p in clf.predict(feats[ep["query"]])]
                    for q, t, p in zip(ep["query"], ep["query_labels"], pred):
                        if p == -2:
                            continue
                        records[m, k].append({"patient": patients[q], "truth": names[t], "prediction": names[p]})
            print(f"fold {f}: {m} " + ", ".join(
                f"{k}-shot {100 * sum(r['truth'] == r['prediction'] for r in records[m, k]) / len(records[m, k]):.1f}"
                for k in shots) + f" (train {train_seconds[m][-1]:.0f} s)", flush=True)
    results = {"methods": {}, "shots": list(shots), "folds": [[patients[i] for i in f] for f in folds],
               "n_episodes_per_fold": n_episodes, "meta_train": {"epochs": epochs, "episodes_per_epoch": train_episodes},
               "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
    if 1 in by_count:
        results["atlas_masks"] = by_count[1][1]
    if 4 in by_count:
        results["multiatlas_masks"] = by_count[4][1]
    for m in methods:
        results["methods"][m] = {str(k): patient_accuracy_summary(records[m, k], names) for k in shots}
        results["methods"][m]["train_seconds_per_fold"] = [round(s, 1) for s in train_seconds[m]]
    return results


def table(results: dict) -> str:
    shots = results["shots"]

    def cell(s):
        ci = "" if s["ci95"] is None else f" ± {100 * s['ci95']:.1f}"
        return f"{100 * s['mean']:.1f}{ci} [{s['n_subjects']}]"

    lines = ["| method | " + " | ".join(f"5-way {k}-shot" for k in shots) + " | per class, 5-shot ("
             + ", ".join(results["methods"][next(iter(results["methods"]))][str(shots[-1])]["classes"]) + ") |",
             "|---|" + "---:|" * len(shots) + "---|"]
    for m, r in results["methods"].items():
        per = r[str(shots[-1])]["per_class"]
        lines.append(f"| {m} | " + " | ".join(cell(r[str(k)]) for k in shots) + " | "
                     + " / ".join(f"{100 * v:.0f}" for v in per.values()) + " |")
    lines.append("| chance | " + " | ".join("20.0" for _ in shots) + " | |")

    def masks(key):
        m = results.get(key)
        if not m:
            return " (not run)"
        return (f" (mean mask Dice {100 * m['mask_dice_mean']:.1f} over ED and ES, {len(m['failed'])} of "
                f"{m['patients']} patients with a structure lost, counted wrong)")
    lines.append("| ACDC challenge, fully supervised (published) | | | 92-96 on its test set, 100 training patients, "
                 "features from segmentations |")
    note = (f"\nAccuracy %, mean ± 95% t-interval over query patients [patients] (each patient's accuracy averaged over "
            f"the episodes that queried it); {len(results['folds'])}-fold cross-validation over the 30 patients, "
            f"stratified by diagnosis; {results['n_episodes_per_fold']} episodes per fold and K, one query patient "
            f"per diagnosis, K support patients per diagnosis from the other patients. Image learners: meta-trained "
            f"on the fold's 20 training patients, {results['meta_train']['epochs']} epochs of "
            f"{results['meta_train']['episodes_per_epoch']} 5-way 1-shot episodes in meta-batches of 4; ED and ES "
            f"as two channels, 64 x 64 x 16 at 3 x 3 x 8 mm. Biomarkers: from the ground-truth masks; *_atlas: the "
            f"query's from masks registered from a patient of another diagnosis (`AtlasSegmenter`, in-plane "
            f"rotation search)" + masks("atlas_masks")
            + "; *_multiatlas: from 4 atlases, one of each other diagnosis, fused by locally weighted voting"
            + masks("multiatlas_masks") + "; *_selfseg / *_multiselfseg: every case's indices (the support cases' "
            "too) from its own registered masks, as when the confirmed cases come without masks: only the atlases "
            "are outlined. "
            f"Measured {results['date']} on {results['machine'].get('cpu_count', '?')} CPU cores.")
    confusion = []
    for m, r in results["methods"].items():
        s = r[str(shots[-1])]
        confusion.append(f"{m} ({shots[-1]}-shot), rows truth / columns prediction "
                         f"({', '.join(s['classes'])}): " + "; ".join(" ".join(str(v) for v in row)
                                                                        for row in s["confusion"]))
    return "\n".join(lines) + "\n" + note + "\n\nConfusion matrices (counts over all queries):\n\n" + "\n".join(
        f"- {c}" for c in confusion)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--shots", default="1,5")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=40, help="evaluation episodes per fold and K")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train_episodes", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collect", action="store_true", help="only redo the README table from the JSON")
    p.add_argument("--merge", action="store_true", help="add these methods to the existing JSON (same folds)")
    p.add_argument("--atlas_only", action="store_true", help="only segment the patients by atlas (kept in _work/)")
    p.add_argument("--atlas_part", default="0/1", help="i/n: with --atlas_only, every n-th patient from the i-th")
    p.add_argument("--atlas_count", type=int, default=1, choices=(1, 4), help="with --atlas_only: atlases per patient")
    a = p.parse_args(argv)
    out = RESULTS_DIR / "diagnosis.json"
    if a.atlas_only:
        torch.set_num_threads(1)
        from monai_metalearn.diagnosis import acdc_cases

        i, n = (int(v) for v in a.atlas_part.split("/"))
        print(atlas_biomarkers(acdc_cases(), part=(i, n), count=a.atlas_count)[1])
        return
    if a.collect:
        results = json.loads(out.read_text())
    else:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
        results = run(methods, [int(k) for k in a.shots.split(",")], a.folds, a.episodes, a.epochs,
                      a.train_episodes, a.seed)
        if a.merge and out.is_file():
            old = json.loads(out.read_text())
            if old["folds"] != results["folds"] or old["shots"] != results["shots"]:
                raise SystemExit(f"{out} holds other folds or shots: run without --merge")
            old["methods"].update(results["methods"])
            for key in ("atlas_masks", "multiatlas_masks"):  # the atlas methods were run again: new masks
                if results.get(key):
                    old[key] = results[key]
            results = old
        write_json(out, results)
    update_readme_table(MARKER, table(results))
    print(table(results))


if __name__ == "__main__":
    main()
