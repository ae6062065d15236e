"""Few-shot accuracy of every learner on the held-out CT structures, through the classification bundle.

Each learner is meta-trained with the bundle's default ``train.json`` (``python -m monai.bundle run``, exactly what a
user runs) and evaluated with ``evaluate.json``: 5-way 1-shot and 5-shot, 15 queries, on the test classes, support
from one CT and query from the other. Writes ``results/accuracy.json`` and the tables in ``benchmarks/README.md``
and ``bundles/fewshot_classification_3d/docs/README.md``.

Usage::

    python benchmarks/bench_accuracy.py                       # all learners, bundle defaults
    python benchmarks/bench_accuracy.py --learners protonet,maml --test_episodes 600 --jobs 1
    python benchmarks/bench_accuracy.py --from-json           # only rewrite the tables

Training classes include brain structures whose images are SYNTHESIZED from the real SynthSeg label maps; the test
classes are real CT structures of 2 subjects (TotalSegmentator CT-1 and CT-2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
LEARNERS = ("finetune", "protonet", "maml", "fomaml", "anil", "metasgd", "reptile")
MARKER = "accuracy"


def run_learner(name: str, work: Path, test_episodes: int, threads: int, reuse: bool = False) -> dict:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    if reuse and trained(out):
        train_s = log_seconds(out / "train.log")
        print(f"{name}: reusing the checkpoint trained earlier ({train_s:.0f} s)", flush=True)
    else:
        train_s = run_bundle(BUNDLE, ["train.json"], out, work / "cache", threads, "--learner_name", name)
    eval_s = run_bundle(BUNDLE, ["train.json", "evaluate.json"], out, work / "cache", threads, "--learner_name", name,
                    "--test_episodes", str(test_episodes))
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"{name}: 1-shot {metrics['by_shot']['1']['accuracy']['mean']:.3f} "
          f"5-shot {metrics['by_shot']['5']['accuracy']['mean']:.3f} (train {train_s:.0f} s)", flush=True)
    return {"learner": name, "train_seconds": round(train_s, 1), "evaluate_seconds": round(eval_s, 1),
            "metrics": metrics}


def table(results: dict) -> str:
    rows = ["| learner | 5-way 1-shot acc. % (95% CI) | 5-way 5-shot acc. % (95% CI) | episodes | train time (s) |",
            "|---|---:|---:|---:|---:|"]
    best = max(results["runs"], key=lambda r: r["metrics"]["by_shot"]["5"]["accuracy"]["mean"])
    for r in results["runs"]:
        cells = []
        for k in ("1", "5"):
            acc = r["metrics"]["by_shot"][k]["accuracy"]
            cells.append(f"{100 * acc['mean']:.1f} ± {100 * acc['ci95']:.1f}")
        name = f"**{r['learner']}**" if r is best else r["learner"]
        n_ep = r["metrics"]["by_shot"]["5"]["accuracy"]["n_episodes"]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {n_ep} | {r['train_seconds']:.0f} |")
    cfg = results["config"]
    counts = sorted({r["metrics"]["by_shot"]["5"]["accuracy"]["n_episodes"] for r in results["runs"]})
    n = " or ".join(str(c) for c in counts)
    subjects = results["runs"][0]["metrics"]["test_subjects"]
    rows.append("")
    if results.get("not_measured"):
        rows.append(f"Not measured in this run (CPU time): {', '.join(results['not_measured'])}.")
        rows.append("")
    for note in results.get("notes", []):
        rows.append(note)
        rows.append("")
    rows.append(
        f"{n} episodes per setting (5-way, {cfg['q_query']} queries per class; chance 20%), "
        f"{len(cfg['test_classes'])} held-out real CT structures ({', '.join(cfg['test_classes'])}) of "
        f"{len(subjects)} subjects ({', '.join(subjects)}): support from one CT, query from the other. "
        f"Meta-training: {len(cfg['train_classes'])} classes from real CT, the real T1 MRI and brain structures with "
        f"SYNTHETIC images drawn from the 20 real SynthSeg label maps; bundle defaults ({cfg['epochs']} x "
        f"{cfg['episodes_per_epoch']} meta-batches of {cfg['meta_batch_size']} episodes). Measured "
        f"{results['date']} on {results['machine'].get('cpu_count')} CPU cores ({results['jobs']} runs in "
        f"parallel, {results['threads']} thread(s) each). The CI is the 95% t-interval over episodes; with 2 "
        f"subjects behind the test classes it measures episode-to-episode spread, not population uncertainty."
    )
    return "\n".join(rows)


def _config() -> dict:
    cfg = json.loads((BUNDLE / "configs" / "train.json").read_text())
    cfg.update(json.loads((BUNDLE / "configs" / "evaluate.json").read_text()))
    keys = ("train_classes", "val_classes", "test_classes", "sources", "pixdim", "spatial_size", "n_views", "epochs",
            "episodes_per_epoch", "meta_batch_size", "n_way", "k_shot", "features", "learner_defaults")
    return {k: cfg[k] for k in keys} | {"q_query": cfg["test_q_query"]}


def collect(work: Path, learners: list[str], args: argparse.Namespace) -> dict:
    runs = []
    for name in learners:
        out = work / name
        if not (out / "metrics.json").is_file():
            print(f"{name}: not finished, left out")
            continue
        runs.append({"learner": name, "train_seconds": round(log_seconds(out / "train.log"), 1),
                     "evaluate_seconds": round(log_seconds(out / "evaluate.log"), 1),
                     "metrics": json.loads((out / "metrics.json").read_text())})
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "jobs": args.jobs,
            "threads": args.threads, "config": _config(), "runs": runs,
            "not_measured": [n for n in learners if n not in {r["learner"] for r in runs}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--test_episodes", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2, help="learners trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--work", default=str(BENCH_DIR / "_work" / "accuracy"))
    parser.add_argument("--from-json", action="store_true", help="only rewrite the README tables")
    parser.add_argument("--reuse", action="store_true",
                        help="skip training where --work already holds a finished checkpoint of the learner")
    parser.add_argument("--collect", action="store_true",
                        help="build the results from the learners already finished in --work (an interrupted run)")
    args = parser.parse_args()
    out_json = RESULTS_DIR / "accuracy.json"
    if args.from_json:
        results = json.loads(out_json.read_text())
    elif args.collect:
        results = collect(Path(args.work), [n.strip() for n in args.learners.split(",") if n.strip()], args)
        write_json(out_json, results)
    else:
        if not os.environ.get("MONAI_DATA_DIRECTORY"):
            raise SystemExit("set MONAI_DATA_DIRECTORY")
        work = Path(args.work)
        learners = [n.strip() for n in args.learners.split(",") if n.strip()]
        # build the patch cache once, before the parallel jobs
        first = learners[0]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            head = run_learner(first, work, args.test_episodes, args.threads, args.reuse)
            runs = [head] + list(pool.map(lambda n: run_learner(n, work, args.test_episodes, args.threads, args.reuse),
                                          learners[1:]))
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine_info(),
            "jobs": args.jobs,
            "threads": args.threads,
            "config": _config(),
            "runs": runs,
        }
        write_json(out_json, results)
    md = table(results)
    update_readme_table(MARKER, md)
    if DOCS.is_file():
        update_readme_table(MARKER, md, readme=DOCS)
    print(md)


if __name__ == "__main__":
    main()
