"""Few-shot diagnosis of AdrenalMNIST3D adrenal shapes (normal vs adrenal mass): 2-way K-shot, test-split queries.

Every volume of the official MedMNIST v2 splits is one case (``monai_metalearn.diagnosis.adrenal_cases``, 28^3
binary masks). Evaluation episodes (``adrenal_episodes``) draw K support cases per class from the *train* split and
query the 298 *test* cases: every test case is queried ``--repeats`` times, each time beside another random support,
and every method sees the same episodes. The image learners are meta-trained on 2-way episodes of the train split
only; the validation split serves early stopping only (the epoch with the best validation balanced accuracy is
kept), and nothing is chosen on the test split.

Methods:

* ``shape_centroid`` / ``shape_logistic``: the radiomics shape biomarkers of the mask (``shape_biomarkers``: volume,
  surface, sphericity, principal axes, elongation, flatness, extents, fill, pieces), classified on the support alone
  by ``BiomarkerClassifier`` (nearest centroid / L2 logistic regression after support standardisation);
* ``voxel_centroid``: nearest centroid on the raw voxels (``PatchCentroidReference(pool=1)``): the trivial image
  reference;
* ``protonet``, ``matching``: a small 3D CNN (``ConvEncoder3D``, 8-16-32-32 channels, GroupNorm) meta-trained on
  2-way 5-shot 5-query episodes of the train split (``MetaTrainer``, Adam, meta-batches of 4);
* ``protonet_untrained``: the same encoder at its initial weights (what meta-training adds);
* references: always ``normal`` (the majority class), chance, and the fully supervised baselines published by MedMNIST
  v2 (trained on all 1,188 training volumes).

Summaries (``adrenal_summary``): accuracy per test case (mean over its episodes), then mean ± 95% Student-t interval
over the 298 cases; balanced accuracy (mean of the two classes' accuracies, chance 50% whatever the prevalence);
per class; confusion matrix; case-level ROC AUC of the mean predicted mass probability; and paired per-case
differences against the references. Writes ``results/adrenal.json`` and the README table (marker ``adrenal``).

Usage::

    python benchmarks/bench_adrenal.py                  # every method, K = 1, 5, 10 (about 4 CPU minutes, 1 thread)
    python benchmarks/bench_adrenal.py --methods shape_centroid,shape_logistic,voxel_centroid
    python benchmarks/bench_adrenal.py --collect        # only redo the README table from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, update_readme_table, write_json  # noqa: E402

MARKER = "adrenal"
METHODS = ("shape_centroid", "shape_logistic", "voxel_centroid", "protonet", "matching", "protonet_untrained")
IMAGE_METHODS = ("protonet", "matching", "protonet_untrained")
REFERENCES = ("voxel_centroid", "protonet_untrained")
#: MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), Table 4, AdrenalMNIST3D test split, 28^3: fully supervised
#: on the 1,188 training volumes. Approximate (quoted, not re-run here): ResNet-18+3D AUC 0.83, ACC 0.72; over its
#: ResNet-18/50 (2.5D, 3D, ACS) and AutoML baselines, AUC about 0.72-0.84 and ACC about 0.70-0.80.
MEDMNIST = {"model": "ResNet-18+3D", "acc": 0.721, "auc": 0.827, "acc_range": [0.70, 0.80], "auc_range": [0.72, 0.84],
            "train_volumes": 1188, "source": "MedMNIST v2, Yang et al., Sci. Data 10:41 (2023), Table 4 (approximate)"}


def encoder():
    from monai_metalearn.networks import ConvEncoder3D

    return ConvEncoder3D(in_channels=1, features=(8, 16, 32, 32), pooled_size=2)


def balanced(summary: dict) -> float:
    return float(summary["balanced_accuracy"])


def subset(cases: list[dict], episodes: list[dict]) -> tuple[list[dict], list[dict]]:
    """Only the cases the episodes use, and the episodes re-indexed into that list (fewer cases to embed)."""
    used = sorted({i for e in episodes for i in e["support"] + e["query"]})
    new = {i: j for j, i in enumerate(used)}
    return ([cases[i] for i in used],
            [{**e, "support": [new[i] for i in e["support"]], "query": [new[i] for i in e["query"]]} for e in episodes])


def meta_train(name: str, cases: list[dict], epochs: int, episodes: int, seed: int, val_episodes: list[dict],
               lr: float = 1e-3):
    """A learner meta-trained on 2-way 5-shot 5-query episodes of the train split, the epoch of best validation
    balanced accuracy kept (early stopping); returns ``(learner, info)``."""
    from ignite.engine import Events

    from monai_metalearn.data import ClassificationEpisodeDataset, episode_loader
    from monai_metalearn.diagnosis import adrenal_summary, evaluate_episodes, learner_predictor
    from monai_metalearn.engines import MetaTrainer
    from monai_metalearn.learners import create_learner

    torch.manual_seed(seed)
    enc = encoder()
    feature_dim = int(enc(torch.zeros(1, *cases[0]["image"].shape)).shape[1])
    learner = create_learner(name.replace("_untrained", ""), enc, feature_dim, n_way=2)
    if name.endswith("_untrained") or epochs == 0:
        return learner.eval(), {"epochs": 0}
    train = [c for c in cases if c["split"] == "train"]
    data = ClassificationEpisodeDataset(train, n_way=2, k_shot=5, q_query=5, num_episodes=episodes, seed=seed)
    trainer = MetaTrainer(device="cpu", max_epochs=epochs, train_data_loader=episode_loader(data, meta_batch_size=4),
                          learner=learner, optimizer=torch.optim.Adam(learner.parameters(), lr=lr))
    curve, best = [], {"score": -1.0, "state": None, "epoch": 0}
    val_cases, val_eps = subset(cases, val_episodes)

    def validate(engine):
        learner.eval()
        s = adrenal_summary(evaluate_episodes(learner_predictor(learner, val_cases, cache=True), val_cases, val_eps),
                            auc_resamples=0)
        learner.train()
        curve.append(round(balanced(s), 4))
        if balanced(s) > best["score"]:
            best.update(score=balanced(s), state=copy.deepcopy(learner.state_dict()), epoch=engine.state.epoch)
        print(f"  {name} epoch {engine.state.epoch}: validation balanced accuracy {100 * balanced(s):.1f}", flush=True)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    trainer.run()
    learner.load_state_dict(best["state"])
    return learner.eval(), {"epochs": epochs, "val_balanced_accuracy": curve, "best_epoch": best["epoch"]}


def paired(per_a: dict, per_b: dict, truth: dict, names) -> dict:
    """Paired per-case difference a - b: accuracy (mean ± t-interval over cases) and balanced accuracy."""
    from monai_metalearn.metrics import mean_ci95

    diffs = {c: per_a[c] - per_b[c] for c in per_a}
    mean, ci = mean_ci95(list(diffs.values()), method="t")
    by_class = [mean_ci95([d for c, d in diffs.items() if truth[c] == k], method="t") for k in names]
    bal = float(np.mean([m for m, _ in by_class]))
    bal_ci = math.sqrt(sum(h * h for _, h in by_class)) / len(by_class)
    return {"accuracy": mean, "accuracy_ci95": ci, "balanced": bal, "balanced_ci95": bal_ci}


def run(methods, shots, repeats, query_size, epochs, train_episodes, seed, threads):
    from monai_metalearn.data.sources import ADRENAL_CLASSES
    from monai_metalearn.diagnosis import (adrenal_cases, adrenal_episodes, adrenal_summary, evaluate_episodes,
                                           learner_predictor, shape_biomarker_matrix, shape_predictor)
    from monai_metalearn.learners import PatchCentroidReference

    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    cases = adrenal_cases()
    names = list(ADRENAL_CLASSES)
    truth = {c["id"]: c["class"] for c in cases}
    timing: dict[str, float] = {}
    feats = None
    if any(m.startswith("shape") for m in methods):
        t1 = time.perf_counter()
        feats = shape_biomarker_matrix(cases)
        timing["shape_biomarkers_s"] = round(time.perf_counter() - t1, 1)
    print(f"{len(cases)} cases loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    episodes = {k: adrenal_episodes(cases, k, repeats=repeats, query_size=query_size, seed=seed + k) for k in shots}
    val_episodes = adrenal_episodes(cases, 5, repeats=3, query_size=49, seed=seed + 999, query_split="val")
    results = {"methods": {}, "shots": list(shots), "repeats": repeats, "query_size": query_size,
               "n_episodes_per_shot": len(episodes[shots[0]]), "classes": names,
               "meta_train": {"epochs": epochs, "episodes_per_epoch": train_episodes, "k_shot": 5, "q_query": 5,
                              "meta_batch_size": 4, "lr": 1e-3},
               "medmnist_supervised": MEDMNIST, "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
    per_case: dict[tuple[str, int], dict] = {}
    for m in methods:
        t1 = time.perf_counter()
        info = {}
        if m in IMAGE_METHODS:
            learner, info = meta_train(m, cases, epochs, train_episodes, seed, val_episodes)
            info["train_s"] = round(time.perf_counter() - t1, 1)
            predict = learner_predictor(learner, cases, cache=True)
        elif m == "voxel_centroid":
            predict = learner_predictor(PatchCentroidReference(pool=1), cases)
        else:
            predict = shape_predictor(feats, m.split("_", 1)[1])
        t2 = time.perf_counter()
        out = dict(info)
        for k in shots:
            s = adrenal_summary(evaluate_episodes(predict, cases, episodes[k]))
            per_case[m, k] = s.pop("per_patient")
            out[str(k)] = s
        out["eval_s"] = round(time.perf_counter() - t2, 1)
        results["methods"][m] = out
        print(f"{m}: " + ", ".join(f"{k}-shot acc {100 * out[str(k)]['mean']:.1f} bal "
                                   f"{100 * out[str(k)]['balanced_accuracy']:.1f} AUC {out[str(k)]['auc']:.3f}"
                                   for k in shots) + f" ({time.perf_counter() - t1:.0f} s)", flush=True)
    comparisons = {}
    for m in methods:
        for ref in REFERENCES:
            if ref in methods and ref != m:
                comparisons[f"{m} - {ref}"] = {str(k): paired(per_case[m, k], per_case[ref, k], truth, names)
                                               for k in shots}
    results["paired_differences"] = comparisons
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["cpu_s"] = round(time.process_time() - c0, 1)  # the machine is shared: CPU time next to wall time
    return results


def verdict(results: dict) -> list[str]:
    """Which methods beat the references, from the intervals (plain sentences for the README)."""
    shots = results["shots"]
    lines = []
    for m, r in results["methods"].items():
        s_chance = [k for k in shots if r[str(k)]["balanced_accuracy"] - (r[str(k)]["balanced_ci95"] or 0) > 0.5]
        s_major = [k for k in shots if r[str(k)]["mean"] - (r[str(k)]["ci95"] or 0) > r[str(k)]["majority_accuracy"]]
        beats = []
        for ref in REFERENCES:
            d = results["paired_differences"].get(f"{m} - {ref}")
            if d is None:
                continue
            ks = [k for k in shots if d[str(k)]["balanced"] - d[str(k)]["balanced_ci95"] > 0]
            worse = [k for k in shots if d[str(k)]["balanced"] + d[str(k)]["balanced_ci95"] < 0]
            beats.append(f"beats {ref} at K = {', '.join(map(str, ks))}" if ks else f"does not beat {ref}")
            if worse:
                beats[-1] += f" (worse at K = {', '.join(map(str, worse))})"
        sup = results["medmnist_supervised"]["auc"]
        lo, hi = r[str(shots[-1])]["auc_ci95"]
        where = "contains" if lo <= sup <= hi else ("lies above" if lo > sup else "lies below")
        beats.append(f"{shots[-1]}-shot AUC {r[str(shots[-1])]['auc']:.3f} (bootstrap 95% interval {lo:.3f}-{hi:.3f}, "
                     f"which {where} the published fully supervised ~{sup:.2f})")
        lines.append(
            f"**{m}**: balanced accuracy above chance at K = {', '.join(map(str, s_chance)) or 'none'}; "
            f"plain accuracy above always-normal ({100 * r[str(shots[0])]['majority_accuracy']:.1f}) at K = "
            f"{', '.join(map(str, s_major)) or 'none'}" + ("; " + "; ".join(beats) if beats else "") + ".")
    return lines


def table(results: dict) -> str:
    shots = results["shots"]
    last = str(shots[-1])

    def pct(mean, ci, n=None):
        return f"{100 * mean:.1f}" + ("" if ci is None else f" ± {100 * ci:.1f}") + ("" if n is None else f" [{n}]")

    head = ("| method | " + " | ".join(f"acc {k}-shot" for k in shots) + " | "
            + " | ".join(f"bal. acc {k}-shot" for k in shots) + " | AUC " + " / ".join(map(str, shots))
            + f" | per class {last}-shot (normal / mass) |")
    lines = [head, "|---|" + "---:|" * (2 * len(shots) + 1) + "---|"]
    for m, r in results["methods"].items():
        per = r[last]["per_class"]
        lines.append(f"| {m} | " + " | ".join(pct(r[str(k)]["mean"], r[str(k)]["ci95"], r[str(k)]["n_subjects"])
                                             for k in shots) + " | "
                     + " | ".join(pct(r[str(k)]["balanced_accuracy"], r[str(k)]["balanced_ci95"]) for k in shots)
                     + " | " + " / ".join(f"{r[str(k)]['auc']:.3f}" for k in shots) + " | "
                     + f"{100 * per['normal']:.0f} / {100 * per['adrenal_mass']:.0f} |")
    any_r = next(iter(results["methods"].values()))[last]
    maj = 100 * any_r["majority_accuracy"]
    lines.append(f"| always normal (majority) | " + " | ".join(f"{maj:.1f}" for _ in shots) + " | "
                 + " | ".join("50.0" for _ in shots) + " | 0.5 | 100 / 0 |")
    lines.append("| chance (coin) | " + " | ".join("50.0" for _ in shots) + " | "
                 + " | ".join("50.0" for _ in shots) + " | 0.5 | 50 / 50 |")
    sup = results["medmnist_supervised"]
    cells = [f"~{100 * sup['acc']:.0f} (all {sup['train_volumes']} training volumes)"] + [""] * (2 * len(shots) - 1)
    lines.append(f"| MedMNIST v2 {sup['model']}, fully supervised (published, approximate) | " + " | ".join(cells)
                 + f" | ~{sup['auc']:.2f} | |")
    mt = results["meta_train"]
    trained = {m: r for m, r in results["methods"].items() if r.get("epochs")}
    stops = "; ".join(f"{m} kept epoch {r['best_epoch']} of {r['epochs']} (validation balanced accuracy "
                      + ", ".join(f"{100 * v:.0f}" for v in r["val_balanced_accuracy"]) + ")"
                      for m, r in trained.items())
    n_test = any_r["n_subjects"]
    counts = any_r["n_cases_per_class"]
    note = (
        f"\nAccuracy %, mean ± 95% t-interval over the {n_test} test cases [cases] ({counts['normal']} normal, "
        f"{counts['adrenal_mass']} masses; each case's accuracy averaged over the {results['repeats']} episodes that "
        f"queried it); bal. acc: mean of the two classes' accuracies (chance 50 whatever the prevalence), its interval "
        f"combining the two classes'; AUC: ROC over test cases of each case's mean predicted mass probability. "
        f"{results['n_episodes_per_shot']} episodes per K, {results['query_size']} test queries each, K support "
        f"volumes per class drawn from the train split; the same episodes for every method. Image learners: "
        f"meta-trained on the train split only, {mt['epochs']} epochs of {mt['episodes_per_epoch']} 2-way "
        f"{mt['k_shot']}-shot {mt['q_query']}-query episodes in meta-batches of {mt['meta_batch_size']}, "
        f"the epoch of best validation balanced accuracy kept ({stops or 'none trained'}). **Labelled data "
        f"behind each row**: the shape and voxel classifiers see only the 2K support volumes of an episode; "
        f"ProtoNet and Matching Networks were also meta-trained on labelled episodes of the *same two classes* drawn "
        f"from all {sup['train_volumes']} training volumes (a 2-way task has no novel classes), the same labelled "
        f"data as the MedMNIST baselines, so their K-shot figures are those of a support-conditioned classifier "
        f"trained on the full train split. A case is one gland "
        f"volume: the official splits are by patient (no patient spans train and test), but the release does not "
        f"pair the left and right glands of a patient, so the {n_test} test cases are not {n_test} independent "
        f"patients and the intervals are somewhat narrower than patient-level ones would be. Shape sizes are in "
        f"28^3 grid voxels (the release stores no voxel size). "
        f"Measured {results['date']} on {results['machine'].get('cpu_count', '?')} CPU cores, "
        f"{results['machine'].get('torch_threads', '?')} torch thread(s), {results['total_s'] / 60:.1f} minutes "
        f"wall ({results.get('cpu_s', float('nan')) / 60:.1f} minutes CPU; the machine was shared with other jobs)."
        f"\n\nMedMNIST v2 reference ({sup['source']}): fully supervised on all {sup['train_volumes']} training "
        f"volumes (here: K = {', '.join(map(str, shots))} per class), ACC at a 0.5 threshold on the imbalanced "
        f"test split (the always-normal rule alone scores {maj:.1f}); its baselines span ACC "
        f"{sup['acc_range'][0]:.2f}-{sup['acc_range'][1]:.2f} and AUC {sup['auc_range'][0]:.2f}-"
        f"{sup['auc_range'][1]:.2f}. Compare AUCs (prevalence-free) rather than accuracies: a balanced few-shot "
        f"support carries no prior for the 23% prevalence of masses.")
    confusion = []
    for m, r in results["methods"].items():
        s = r[last]
        confusion.append(f"{m} ({last}-shot): " + "; ".join(" ".join(str(v) for v in row) for row in s["confusion"]))
    return ("\n".join(lines) + "\n" + note + "\n\nWho beats the references (95% intervals; against voxel_centroid "
            "and protonet_untrained: paired per-case differences of balanced accuracy on the same episodes):\n\n"
            + "\n".join(f"- {v}" for v in verdict(results))
            + "\n\nConfusion matrices, rows truth / columns prediction (normal, adrenal_mass), counts over all "
            "queries:\n\n" + "\n".join(f"- {c}" for c in confusion))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--shots", default="1,5,10")
    p.add_argument("--repeats", type=int, default=10, help="times each test case is queried, per K")
    p.add_argument("--query_size", type=int, default=30, help="test queries per episode")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train_episodes", type=int, default=40, help="meta-training episodes per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--collect", action="store_true", help="only redo the README table from the JSON")
    p.add_argument("--no-readme", action="store_true", help="print the table, write neither JSON nor README")
    a = p.parse_args(argv)
    out = RESULTS_DIR / "adrenal.json"
    if a.collect:
        results = json.loads(out.read_text())
    else:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
        results = run(methods, [int(k) for k in a.shots.split(",")], a.repeats, a.query_size, a.epochs,
                      a.train_episodes, a.seed, a.threads)
        if not a.no_readme:
            write_json(out, results)
    if not a.no_readme:
        update_readme_table(MARKER, table(results))
    print(table(results))


if __name__ == "__main__":
    main()
