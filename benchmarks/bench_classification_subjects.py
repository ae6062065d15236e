"""Few-shot classification across subjects and modalities (issue 10's protocols), through the classification bundle.

Each learner is meta-trained per fold with ``configs/train.json`` + ``configs/cross_subject.json`` (``python -m
monai.bundle run``, exactly what a user runs) on the training classes of the fold's training subjects (8 BTCV organs
and 45 LPBA40 structures), and evaluated with ``evaluate.json`` on the four protocols of
:data:`monai_metalearn.apps.protocols.CLASSIFICATION_PROTOCOLS`: BTCV organs across subjects (5-way), LPBA40 deep
grey structures across subjects (5-way), ACDC heart structures across patients (3-way), BTCV CT support -> CHAOS MR
query (4-way). Two nearest-centroid references are scored on the same episodes (same seeds, same patches):
``raw voxels`` (z-scored patch intensities) and ``body position`` (the patch's centre and extent in the body frame).

Accuracy is pooled by query subject over the folds: each subject's accuracy first (a subject evaluated by both folds,
CHAOS and ACDC, is averaged over them), then the mean and 95% t-interval over subjects, with their number.

Usage::

    python benchmarks/bench_classification_subjects.py                        # every learner, both folds
    python benchmarks/bench_classification_subjects.py --learners protonet --test_episodes 100
    python benchmarks/bench_classification_subjects.py --from-json            # only rewrite the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_DIR,
    RESULTS_DIR,
    log_seconds,
    machine_info,
    run_bundle,
    trained,
    update_readme_table,
    write_json,
)

ROOT = BENCH_DIR.parent
BUNDLE = ROOT / "bundles" / "fewshot_classification_3d"
DOCS = BUNDLE / "docs" / "README.md"
CONFIGS = ["train.json", "cross_subject.json"]
LEARNERS = ("protonet", "fomaml", "maml", "anil", "metasgd", "finetune", "reptile")
REFERENCES = ("raw_voxels", "body_position")
PROTOCOLS = ("btcv_cross_subject", "lpba40_cross_subject", "acdc_cross_subject", "ct_to_mr")
LABELS = {"btcv_cross_subject": "BTCV CT (5-way)", "lpba40_cross_subject": "LPBA40 T1 (5-way)",
          "acdc_cross_subject": "ACDC cine MR (3-way)", "ct_to_mr": "BTCV CT → CHAOS MR (4-way)"}
TARGETS = {"btcv_cross_subject": 0.85, "lpba40_cross_subject": 0.80, "ct_to_mr": 0.70}
MARKER = "classification_subjects"


def _reference(name: str):
    from monai_metalearn.learners import BodyPositionReference, PatchCentroidReference

    return {"raw_voxels": PatchCentroidReference, "body_position": BodyPositionReference}[name]()


def run_references(fold: int, work: Path, test_episodes: int) -> dict[str, dict]:
    """The references on the bundle's own evaluation episodes: the bundle config is parsed and its ``evaluation``
    expression run with the reference in place of the learner (same patches, seeds and protocols)."""
    from monai.bundle import ConfigParser

    out = {}
    for name in REFERENCES:
        target = work / f"fold{fold}" / name
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / c) for c in [*CONFIGS, "evaluate.json"]])
        parser["bundle_root"] = str(BUNDLE)
        parser["output_dir"] = str(target)
        parser["cache_dir"] = str(work / "cache")
        parser["progress"] = False
        parser["fold"] = fold
        parser["test_episodes"] = test_episodes
        parser["learner_name"] = name
        parser["learner"] = f"$monai_metalearn.learners.{type(_reference(name)).__name__}()"
        t0 = time.perf_counter()
        parser.get_parsed_content("evaluation")
        print(f"fold {fold} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = json.loads((target / "metrics.json").read_text())
    return out


def run_learner(name: str, fold: int, work: Path, test_episodes: int, threads: int, reuse: bool,
                tag: str = "", overrides: tuple[str, ...] = ()) -> dict:
    out = work / f"fold{fold}" / (name + tag)
    out.mkdir(parents=True, exist_ok=True)
    args = ("--learner_name", name, "--fold", str(fold), *overrides)
    if reuse and trained(out) and (out / "cross_subject.log").is_file():
        train_s = log_seconds(out / "cross_subject.log")
    else:
        train_s = run_bundle(BUNDLE, CONFIGS, out, work / "cache", threads, *args)
    eval_s = run_bundle(BUNDLE, [*CONFIGS, "evaluate.json"], out, work / "cache", threads, *args,
                        "--test_episodes", str(test_episodes))
    metrics = json.loads((out / "metrics.json").read_text())
    got = {p: round(m["by_shot"]["5"]["accuracy"]["mean"], 3) for p, m in metrics["protocols"].items()}
    print(f"fold {fold} {name}: 5-shot {got} (train {train_s:.0f} s, evaluate {eval_s:.0f} s)", flush=True)
    return {"train_seconds": round(train_s, 1), "evaluate_seconds": round(eval_s, 1), "metrics": metrics}


def pool_folds(per_fold: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """``{protocol: {shot: {"mean", "ci95", "n_subjects", "n_episodes", "per_subject"}}}`` pooled over folds by
    query subject (see the module docstring)."""
    from monai_metalearn.metrics import mean_ci95

    pooled: dict[str, dict[str, dict]] = {}
    for metrics in per_fold.values():
        for protocol, m in metrics["protocols"].items():
            for shot, s in m["by_shot"].items():
                entry = pooled.setdefault(protocol, {}).setdefault(shot, {"subjects": {}, "n_episodes": 0})
                entry["n_episodes"] += int(s["accuracy"]["n_episodes"])
                for subject, acc in s["accuracy_subjects"]["per_subject"].items():
                    entry["subjects"].setdefault(subject, []).append(float(acc))
    out: dict[str, dict[str, dict]] = {}
    for protocol, shots in pooled.items():
        for shot, entry in shots.items():
            per_subject = {k: sum(v) / len(v) for k, v in sorted(entry["subjects"].items())}
            mean, ci = mean_ci95(list(per_subject.values()))
            out.setdefault(protocol, {})[shot] = {"mean": mean, "ci95": ci, "n_subjects": len(per_subject),
                                                  "n_episodes": entry["n_episodes"], "per_subject": per_subject}
    return out


def _cell(d: dict | None) -> str:
    if d is None:
        return "—"
    ci = "" if d["ci95"] is None or d["ci95"] != d["ci95"] else f" ± {100 * d['ci95']:.1f}"
    return f"{100 * d['mean']:.1f}{ci} [{d['n_subjects']}]"


def table(results: dict) -> str:
    head = "| method | " + " | ".join(f"{LABELS[p]} {k}-shot" for p in PROTOCOLS for k in ("1", "5"))
    rows = [head + " | folds × episodes | train s / fold |", "|---|" + "---:|" * (2 * len(PROTOCOLS) + 2)]
    for name, entry in results["methods"].items():
        cells = [_cell(entry["pooled"].get(p, {}).get(k)) for p in PROTOCOLS for k in ("1", "5")]
        n_ep = entry.get("test_episodes", results["test_episodes"])
        train = entry.get("train_seconds")
        kind = "reference" if name in REFERENCES else "learner"
        label = f"{name} ({kind})"
        n_folds = len(entry.get("folds", {})) or 1
        rows.append(f"| {label} | " + " | ".join(cells)
                    + f" | {n_folds} × {n_ep} | {'—' if train is None else round(train)} |")
    rows.append("| target (issue 10, 5-shot) | | 85 | | 80 | | | | 70 | | |")
    rows.append("")
    verdicts = []
    refs = [r for r in REFERENCES if r in results["methods"]]
    for name, entry in results["methods"].items():
        if name in REFERENCES:
            continue
        parts = []
        for p in PROTOCOLS:
            mine = entry["pooled"].get(p, {}).get("5")
            if mine is None:
                continue
            best_ref = max(refs, key=lambda r: results["methods"][r]["pooled"][p]["5"]["mean"])
            ref = results["methods"][best_ref]["pooled"][p]["5"]
            diff = mine["mean"] - ref["mean"]
            margin = (mine["ci95"] or 0) + (ref["ci95"] or 0)
            word = "beats" if diff > margin else ("loses to" if -diff > margin else "ties")
            target = TARGETS.get(p)
            hit = "" if target is None else (" (target met)" if mine["mean"] >= target else " (target missed)")
            parts.append(f"{LABELS[p]}: {100 * mine['mean']:.1f}{hit}, {word} {best_ref} ({100 * ref['mean']:.1f})")
        verdicts.append(f"- **{name}**, 5-shot: " + "; ".join(parts) + ".")
    rows += verdicts
    rows.append("")
    if results.get("not_measured"):
        rows.append(f"Not measured in this run (CPU time): {', '.join(results['not_measured'])}.")
        rows.append("")
    rows.append(
        "Accuracy % over query subjects (each subject's accuracy first, pooled over the two folds; CHAOS and ACDC "
        "subjects are scored by both folds' models and averaged) ± 95% t-interval over subjects, the number of "
        "distinct query subjects in brackets. Fixed episodes per protocol, shot and fold (15 queries per class; "
        "a learner run on fewer episodes or one fold sees the first of the same episodes and fold 0's test "
        "subjects), support and query from different subjects; the references run on the same episodes. Meta-training per fold: the fold's training subjects only (BTCV 10 of 20, LPBA40 3 of 6), "
        f"{results['config']['n_train_classes']} training classes (8 BTCV organs, 45 LPBA40 structures; "
        "5 LPBA40 structures for validation), none a test class; CHAOS and ACDC are never trained on. Patches of "
        f"{results['config']['spatial_size']} at {results['config']['pixdim']} mm with 3 body-frame coordinate "
        f"channels; bundle defaults ({results['config']['epochs']} x {results['config']['episodes_per_epoch']} "
        f"meta-batches of {results['config']['meta_batch_size']} episodes). Beats / loses to: the difference of the "
        "means exceeds the sum of the two 95% half-widths; ties otherwise. Measured "
        f"{results['date']} on {results['machine'].get('cpu_count')} CPU cores, {results['threads']} thread(s)."
    )
    return "\n".join(rows)


def _config() -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in CONFIGS])
    return {"n_train_classes": len(parser.get_parsed_content("train_classes")),
            **{k: parser[k] for k in ("sources", "pixdim", "spatial_size", "n_views", "epochs", "episodes_per_epoch",
                                      "meta_batch_size", "folds", "val_classes")}}


def _ordered(methods: dict) -> list[str]:
    """References first, then the learners in :data:`LEARNERS` order, each followed by its tagged variants."""
    keys = [k for k in REFERENCES if k in methods]
    for name in LEARNERS:
        keys += sorted(k for k in methods if k == name or k.startswith(name + ":"))
    return keys + [k for k in methods if k not in keys]


def _results(methods: dict, args: argparse.Namespace) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "threads": args.threads,
            "test_episodes": args.test_episodes, "config": _config(),
            "methods": {k: methods[k] for k in _ordered(methods)},
            "not_measured": [n for n in LEARNERS if n not in methods]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--folds", default="0,1")
    parser.add_argument("--test_episodes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per bundle run")
    parser.add_argument("--work", default=str(BENCH_DIR / "_work" / "classification_subjects"))
    parser.add_argument("--from-json", action="store_true", help="only rewrite the README table")
    parser.add_argument("--reuse", action="store_true", help="skip training where --work holds a checkpoint")
    parser.add_argument("--no-references", action="store_true", help="keep the references of the JSON file")
    parser.add_argument("--tag", default="", help="stored as '<learner>:<tag>' (a variant, e.g. an ablation)")
    parser.add_argument("--overrides", default="", help="more bundle overrides for train and evaluate, e.g. "
                        "'--modality_augment False'")
    args = parser.parse_args()
    out_json = RESULTS_DIR / "classification_subjects.json"
    if args.from_json:
        results = json.loads(out_json.read_text())
    else:
        if not os.environ.get("MONAI_DATA_DIRECTORY"):
            raise SystemExit("set MONAI_DATA_DIRECTORY")
        work = Path(args.work)
        folds = [int(f) for f in args.folds.split(",")]
        learners = [n.strip() for n in args.learners.split(",") if n.strip()]
        old = json.loads(out_json.read_text()) if out_json.is_file() else {"methods": {}}
        methods = dict(old.get("methods", {}))
        if not args.no_references:
            per_ref: dict[str, dict] = {r: {} for r in REFERENCES}
            for fold in folds:
                for name, metrics in run_references(fold, work, args.test_episodes).items():
                    per_ref[name][str(fold)] = metrics
            for name in REFERENCES:
                methods[name] = {"pooled": pool_folds(per_ref[name]), "test_episodes": args.test_episodes,
                                 "folds": per_ref[name]}
        tag = f":{args.tag}" if args.tag else ""
        for name in learners:
            per_fold, train_s = {}, []
            for fold in folds:
                run = run_learner(name, fold, work, args.test_episodes, args.threads, args.reuse, tag,
                                  tuple(args.overrides.split()))
                per_fold[str(fold)] = run["metrics"]
                train_s.append(run["train_seconds"])
            methods[name + tag] = {"pooled": pool_folds(per_fold), "test_episodes": args.test_episodes,
                                   "train_seconds": sum(train_s) / len(train_s), "folds": per_fold,
                                   "overrides": args.overrides}
            results = _results(methods, args)
            write_json(out_json, results)  # after each learner: an interrupted run keeps what it measured
        results = _results(methods, args)
        write_json(out_json, results)
    md = table(results)
    update_readme_table(MARKER, md)
    update_readme_table(MARKER, md, readme=DOCS)
    print(md)


if __name__ == "__main__":
    main()
