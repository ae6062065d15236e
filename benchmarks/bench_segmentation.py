"""Few-shot segmentation Dice of every learner on the multi-subject protocols, through the segmentation bundle.

Each learner is meta-trained with the bundle's default ``train.json`` (``python -m monai.bundle run``, exactly what a
user runs) once per cross-validation fold (``--fold 0`` and ``--fold 1``: BTCV and LPBA40 subjects split in two, a
fold's test subjects never trained on) and evaluated with ``evaluate.json --protocol all`` on that fold:

* ``abdominal_ct`` / ``abdominal_mr`` / ``abdominal_ct_to_mr``: liver, spleen, kidneys, 1-shot, support and query
  from different subjects (BTCV CT of the test fold; CHAOS MR, never trained on; BTCV support -> CHAOS query);
* ``heart``: ACDC end-diastole, RV / myocardium / LV, never trained on;
* ``brain``: LPBA40 deep grey matter of the test fold.

The trivial references (``wholebody``: the query's body; ``boxaligned``: the support mask placed by aligning the two
bodies' bounding boxes) run the same episodes. Folds are merged (:func:`~monai_metalearn.apps.segmentation.
merge_fold_metrics`): every figure is the mean over query subjects with its 95% CI over subjects and the number of
subjects behind it. Writes ``results/segmentation.json`` and the tables in ``benchmarks/README.md`` and
``bundles/fewshot_segmentation_3d/docs/README.md``. ``--cost_only`` measures the adaptation time and memory.

Usage::

    python benchmarks/bench_segmentation.py                                  # every learner, both folds, setting 2
    python benchmarks/bench_segmentation.py --learners protoseg,boxaligned --setting 1 --reuse
    python benchmarks/bench_segmentation.py --collect                        # tables from the finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_DIR,
    RESULTS_DIR,
    dice_cell,
    log_seconds,
    machine_info,
    median,
    run_bundle,
    trained,
    update_readme_table,
    write_json,
)

ROOT = BENCH_DIR.parent
BUNDLE = ROOT / "bundles" / "fewshot_segmentation_3d"
DOCS = BUNDLE / "docs" / "README.md"
LEARNERS = ("wholebody", "boxaligned", "protoseg", "finetune", "scratch", "maml", "fomaml", "anil", "reptile")
#: Learners with nothing to meta-train: evaluated without a checkpoint.
UNTRAINED = ("wholebody", "boxaligned")
FOLDS = (0, 1)
PROTOCOL_COLUMNS = (("abdominal_ct", "BTCV CT"), ("abdominal_mr", "CHAOS MR"), ("abdominal_ct_to_mr", "CT → MR"),
                    ("heart", "ACDC heart"), ("brain", "LPBA40 brain"))
#: SSL-ALPNet (Ouyang et al., ECCV 2020), 1-way 1-shot, liver / spleen / kidneys, 2D, mean Dice (%).
ALPNET = {1: {"abdominal_ct": 73.4, "abdominal_mr": 78.8}, 2: {"abdominal_ct": 63.0, "abdominal_mr": 73.0}}
MARKER = "dice"


_ADAPT_SCRIPT = r"""
import json, resource, sys, time, torch
from monai.bundle import ConfigParser
bundle, ckpt, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
parser = ConfigParser()
parser.read_config(f"{bundle}/configs/train.json")
parser["learner_name"] = sys.argv[4]
parser["progress"] = False
parser["cache_dir"] = sys.argv[5]
app = parser.get_parsed_content("imports", instantiate=True)
from monai_metalearn.apps import segmentation as seg
from monai_metalearn.data import SegmentationEpisodeDataset
from monai_metalearn.engines import default_prepare_episode
learner = parser.get_parsed_content("learner")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
learner = seg.load_learner(learner, ckpt, device)
dataset = parser.get_parsed_content("dataset")
patch, n = parser["patch_size"], parser["eval_patches"]
whole = bool(getattr(learner, "whole_volume", False))
episodes = SegmentationEpisodeDataset(dataset, ["liver"], 1, 1, 1, support_transform=seg.volume_transforms() if whole
                                      else seg.patch_transforms(patch, n), query_transform=seg.volume_transforms(),
                                      support_subjects=["btcv_sabs_00"], query_subjects=["btcv_sabs_02"], stack=not whole)
sx, sy, qx, qy = (seg.volume_prepare_episode if whole else default_prepare_episode)(episodes[0], device)
inferer = (lambda x, p: p(x)) if whole else seg.sliding_window_inferer(patch)
learner.eval()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base_cuda = torch.cuda.memory_allocated()
adapt, infer = [], []
for _ in range(repeats):
    t = time.perf_counter()
    with torch.enable_grad():
        predictor = learner.adapt(sx, sy)
    if device.type == "cuda":
        torch.cuda.synchronize()
    adapt.append(time.perf_counter() - t)
    t = time.perf_counter()
    with torch.no_grad():
        logits = inferer(qx, predictor)
    if device.type == "cuda":
        torch.cuda.synchronize()
    infer.append(time.perf_counter() - t)
out = {"adapt_seconds": adapt, "segment_seconds": infer, "support_patches": 0 if whole else int(sx.shape[0]),
       "query_shape": list(qx.shape[2:]), "device": device.type,
       "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024}
if device.type == "cuda":
    out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
print("RESULT " + json.dumps(out))
"""


def adaptation_cost(name: str, out: Path, cache: Path, threads: int, repeats: int = 3) -> dict:
    """Adaptation time and memory of a trained learner on one fixed 1-shot CT episode (liver, BTCV 00 -> 02)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", _ADAPT_SCRIPT, str(BUNDLE), str(out / "model.pt"), str(repeats), name,
                           str(cache)], cwd=BUNDLE, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"adaptation cost of {name} failed:\n{proc.stderr[-2000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["adapt_median_s"] = median(res["adapt_seconds"])
    res["segment_median_s"] = median(res["segment_seconds"])
    return res


_INIT_SCRIPT = r"""
import sys, torch
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config(f"{sys.argv[1]}/configs/train.json")
parser["learner_name"] = sys.argv[2]
torch.manual_seed(0)
learner = parser.get_parsed_content("learner")
torch.save({"learner": learner.state_dict()}, sys.argv[3])
"""


def cost_table(work: Path, learners: list[str], threads: int) -> dict:
    """Adaptation cost of every learner at its initial weights (time and memory do not depend on the weights)."""
    runs = []
    for name in learners:
        out = work / "cost_only" / name
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _INIT_SCRIPT, str(BUNDLE), name, str(out / "model.pt")], check=True,
                       cwd=BUNDLE, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        cost = adaptation_cost(name, out, work / "cache", threads)
        print(f"{name}: adapt {cost['adapt_median_s']:.2f} s, segment {cost['segment_median_s']:.2f} s, "
              f"+{cost['peak_rss_growth_mib']:.0f} MiB", flush=True)
        runs.append({"learner": name, "cost": cost})
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "threads": threads, "runs": runs}


def cost_markdown(results: dict) -> str:
    rows = ["| learner | adapt s (median of 3) | segment query s | peak memory growth MiB | support patches |",
            "|---|---:|---:|---:|---:|"]
    for r in results["runs"]:
        c = r["cost"]
        rows.append(f"| {r['learner']} | {c['adapt_median_s']:.2f} | {c['segment_median_s']:.2f} "
                    f"| {c['peak_rss_growth_mib']:.0f} | {c['support_patches']} |")
    rows.append("")
    rows.append(
        f"One 1-shot episode (liver, support BTCV subject 00, query the whole BTCV subject 02 at 3 mm), bundle "
        f"defaults, initial weights "
        f"(the cost does not depend on them), each learner in a fresh process, {results['threads']} torch thread(s), "
        f"{results['machine'].get('cpu_count')} CPU cores, {results['date']}; device: {results['runs'][0]['cost']['device']}. "
        "Memory: growth of the process's maximum resident set during adaptation and segmentation. No GPU was lent to "
        "this run; on CUDA the script reports peak allocated memory instead."
    )
    return "\n".join(rows)


#: Extra ``train.json`` overrides per learner. The from-scratch baseline has nothing to meta-train (its meta-steps are
#: no-ops), so one epoch only writes the checkpoint that evaluate.json loads. The second-order and Reptile learners
#: cost 3-5x protoseg's time per meta-step on the CPU: half the epochs keep a fold's training near 15 minutes.
TRAIN_ARGS = {"scratch": ["--epochs", "1"], "maml": ["--epochs", "4"], "reptile": ["--epochs", "4"],
              "finetune": ["--epochs", "4"], "fomaml": ["--epochs", "4"]}
#: Extra ``evaluate.json`` overrides per learner: the learners that fine-tune on every support set (tens of seconds
#: per episode on one core) run the first 12 episodes of each protocol and fold (balanced: every structure, 3 query
#: subjects each), the others every episode.
SLOW = ("finetune", "scratch", "maml", "fomaml", "anil", "reptile")
EVAL_ARGS = {name: ["--test_episodes", "12"] for name in SLOW}


def run_fold(name: str, fold: int, setting: int, work: Path, threads: int, reuse: bool) -> dict:
    out = work / f"setting{setting}" / name / f"fold{fold}"
    out.mkdir(parents=True, exist_ok=True)
    common = ["--learner_name", name, "--fold", str(fold), "--setting", str(setting)]
    train_s = 0.0
    if name not in UNTRAINED:
        if reuse and trained(out):
            train_s = log_seconds(out / "train.log")
        else:
            train_s = run_bundle(BUNDLE, ["train.json"], out, work / "cache", threads, *common,
                                 *TRAIN_ARGS.get(name, []))
    if not (reuse and (out / "metrics.json").is_file()):
        run_bundle(BUNDLE, ["train.json", "evaluate.json"], out, work / "cache", threads, *common,
                   "--protocol", "all", *EVAL_ARGS.get(name, []))
    print(f"{name} setting {setting} fold {fold}: done (train {train_s:.0f} s, evaluate "
          f"{log_seconds(out / 'evaluate.log'):.0f} s)", flush=True)
    return {"fold": fold, "train_seconds": round(train_s, 1), "evaluate_seconds": round(log_seconds(out / "evaluate.log"), 1),
            "metrics": json.loads((out / "metrics.json").read_text())}


def summarize_learner(name: str, setting: int, folds: list[dict], cost: dict | None) -> dict:
    from monai_metalearn.apps.segmentation import merge_fold_metrics

    merged = merge_fold_metrics([f["metrics"] for f in folds])
    return {"learner": name, "setting": setting, "folds": [f["fold"] for f in folds],
            "train_seconds": [f["train_seconds"] for f in folds], "evaluate_seconds": [f["evaluate_seconds"] for f in folds],
            "merged": merged, "cost": cost or {},
            "eval_overrides": EVAL_ARGS.get(name, []), "train_overrides": TRAIN_ARGS.get(name, [])}


def _subject_cell(entry: dict | None, part: str | None = None) -> str:
    """``mean ± CI over subjects [subjects]`` in % from a summary (``None``: n/a)."""
    if entry is None:
        return "n/a"
    if part:
        entry = entry.get(part)
        if entry is None:
            return "n/a"
    sub = entry["dice"]["subjects"]
    ci = sub.get("ci95")
    return f"{100 * sub['mean']:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "") + f" [{sub['n_subjects']}]"


def _entry(run: dict, protocol: str, k: str = "1") -> dict | None:
    return run["merged"]["by_protocol"].get(protocol, {}).get(k)


def table(results: dict) -> str:
    runs = results["runs"]
    cols = " | ".join(label for _, label in PROTOCOL_COLUMNS)
    rows = [f"| learner | setting | {cols} | episodes | train s / fold |",
            "|---|---:|" + "---:|" * len(PROTOCOL_COLUMNS) + "---:|---:|"]
    for r in runs:
        cells = " | ".join(_subject_cell(_entry(r, p)) for p, _ in PROTOCOL_COLUMNS)
        train = "—" if r["learner"] in UNTRAINED else " / ".join(f"{t:.0f}" for t in r["train_seconds"])
        rows.append(f"| {r['learner']} | {r['setting']} | {cells} | {r['merged']['n_episodes']} | {train} |")
    for setting, anchor in ALPNET.items():
        cells = " | ".join(f"{anchor[p]:.1f} (2D)" if p in anchor else "" for p, _ in PROTOCOL_COLUMNS)
        rows.append(f"| SSL-ALPNet, published | {setting} | {cells} | | |")
    rows.append("")
    rows.append("Per structure, 1-shot Dice % (mean ± 95% CI over query subjects [subjects]):")
    rows.append("")
    structures: list[tuple[str, str]] = []
    for r in runs:
        for p, _ in PROTOCOL_COLUMNS:
            for s in (_entry(r, p) or {}).get("per_structure", {}):
                if (p, s) not in structures:
                    structures.append((p, s))
    rows.append("| protocol | structure | " + " | ".join(f"{r['learner']} ({r['setting']})" for r in runs) + " |")
    rows.append("|---|---|" + "---:|" * len(runs))
    for p, s in structures:
        cells = []
        for r in runs:
            d = (_entry(r, p) or {}).get("per_structure", {}).get(s)
            if d is None:
                cells.append("n/a")
                continue
            sub = d["subjects"]
            ci = sub.get("ci95")
            cells.append(f"{100 * sub['mean']:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")
                         + f" [{sub['n_subjects']}]")
        rows.append(f"| {p} | {s} | " + " | ".join(cells) + " |")
    rows.append("")
    notes = [f"{r['learner']}: {' '.join(r['train_overrides'])} (training), {' '.join(r['eval_overrides'])} "
             "(evaluation)" for r in runs if r["train_overrides"] or r["eval_overrides"]]
    if notes:
        rows.append("Per-learner overrides of the bundle defaults (`TRAIN_ARGS` / `EVAL_ARGS` in "
                    f"`bench_segmentation.py`): {'; '.join(dict.fromkeys(notes))}.")
        rows.append("")
    cfg = results["config"]
    rows.append(
        "Dice % of whole query volumes, 1-way 1-shot, support and query from different subjects; mean over query "
        "subjects (each subject's episodes averaged first) ± 95% t-interval over subjects, the number of distinct "
        "query subjects in brackets; two-fold cross-validation over the BTCV and LPBA40 subjects (a fold's test "
        "subjects are never its training subjects; CHAOS and ACDC are never trained on, so both folds' models "
        "segment them and their subjects' episodes are averaged). Learned methods: meta-trained on "
        f"{len(cfg['train_structures'])} structures (the other BTCV organs and LPBA40 gyri of the fold's training "
        f"subjects), {cfg['epochs']} x {cfg['episodes_per_epoch']} meta-batches of {cfg['meta_batch_size']} "
        f"episodes, {cfg['n_patches']} patches of {cfg['patch_size']} per subject, 3 mm (LPBA40 1.5 mm, ACDC "
        "1.5 x 1.5 x 3 mm); setting 2 ignores the test organs' voxels in training scans, setting 1 leaves them as "
        "background. Every predicted mask is reduced to its largest connected component. SSL-ALPNet's published "
        "figures are 2D (slices holding the organ, 2D Dice), trained on the other BTCV / CHAOS subjects with "
        "supervoxel self-supervision and an ImageNet-pretrained ResNet-101: they are beside the table for scale, "
        f"not on the same protocol. Measured {results['date']} on {results['machine'].get('cpu_count')} CPU cores "
        f"({results['jobs']} runs in parallel, {results['threads']} thread(s) each)."
    )
    return "\n".join(rows)


def _config() -> dict:
    cfg = json.loads((BUNDLE / "configs" / "train.json").read_text())
    cfg.update(json.loads((BUNDLE / "configs" / "evaluate.json").read_text()))
    keys = ("train_structures", "val_structures", "test_ct_structures", "test_brain_structures",
            "test_heart_structures", "sources", "pixdim", "source_pixdim", "folds", "patch_size", "n_patches",
            "eval_patches", "epochs", "episodes_per_epoch", "meta_batch_size", "channels", "feature_channels",
            "learner_defaults", "test_shots", "test_episodes")
    return {k: cfg[k] for k in keys}


def collect(work: Path, learners: list[str], settings: list[int], args: argparse.Namespace) -> dict:
    runs, missing = [], []
    for setting in settings:
        for name in learners:
            folds = []
            for fold in FOLDS:
                out = work / f"setting{setting}" / name / f"fold{fold}"
                if (out / "metrics.json").is_file():
                    folds.append({"fold": fold, "train_seconds": round(log_seconds(out / "train.log"), 1)
                                  if (out / "train.log").is_file() else 0.0,
                                  "evaluate_seconds": round(log_seconds(out / "evaluate.log"), 1),
                                  "metrics": json.loads((out / "metrics.json").read_text())})
            if len(folds) < len(FOLDS):
                missing.append(f"{name} (setting {setting}): {len(folds)} of {len(FOLDS)} folds")
            if folds:
                cost_file = work / "cost" / f"{name}.json"
                cost = json.loads(cost_file.read_text()) if cost_file.is_file() else None
                runs.append(summarize_learner(name, setting, folds, cost))
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "jobs": args.jobs, "threads": args.threads,
            "config": _config(), "runs": runs, "incomplete": missing}


def _merged(results: dict, out_json: Path) -> dict:
    """``results`` plus the runs of ``out_json`` for learners (and settings) this run did not measure, so that
    measuring one learner keeps the table's other rows."""
    if not out_json.is_file():
        return results
    old = json.loads(out_json.read_text())
    measured = {(r["learner"], r["setting"]) for r in results["runs"]}
    kept = [r for r in old.get("runs", []) if (r["learner"], r["setting"]) not in measured]
    order = {name: i for i, name in enumerate(LEARNERS)}
    results["runs"] = sorted(kept + results["runs"], key=lambda r: (order.get(r["learner"], len(order)), r["setting"]))
    kept_names = {r["learner"] for r in kept}
    results["incomplete"] = [m for m in old.get("incomplete", []) if m.split(" ")[0] in kept_names] + \
        results["incomplete"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--jobs", type=int, default=1, help="learners trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--settings", default="2", help="comma-separated: 1, 2 or 1,2")
    parser.add_argument("--folds", default=",".join(map(str, FOLDS)),
                        help="comma-separated folds to run (the table marks learners with fewer folds)")
    parser.add_argument("--work", default=str(BENCH_DIR / "_work" / "segmentation"))
    parser.add_argument("--reuse", action="store_true", help="skip what --work already holds for a learner")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the README tables")
    parser.add_argument("--collect", action="store_true", help="results from the learners finished in --work")
    parser.add_argument("--cost_only", action="store_true",
                        help="only the adaptation cost of every learner (initial weights), results/segmentation_cost.json")
    args = parser.parse_args()
    if args.cost_only:
        work = Path(args.work)
        learners = [n.strip() for n in args.learners.split(",") if n.strip()]
        results = cost_table(work, learners, args.threads)
        write_json(RESULTS_DIR / "segmentation_cost.json", results)
        md = cost_markdown(results)
        update_readme_table("adapt_cost", md)
        if DOCS.is_file():
            update_readme_table("adapt_cost", md, readme=DOCS)
        print(md)
        return
    out_json = RESULTS_DIR / "segmentation.json"
    learners = [n.strip() for n in args.learners.split(",") if n.strip()]
    settings = [int(v) for v in args.settings.split(",") if v.strip()]
    if args.from_json:
        results = json.loads(out_json.read_text())
    elif args.collect:
        results = collect(Path(args.work), learners, settings, args)
        write_json(out_json, results, compact=True)
    else:
        if not os.environ.get("MONAI_DATA_DIRECTORY"):
            raise SystemExit("set MONAI_DATA_DIRECTORY")
        work = Path(args.work)
        folds = [int(v) for v in args.folds.split(",") if v.strip()]
        jobs = [(n, f, s) for s in settings for n in learners for f in folds]
        if not any((work / "cache").glob("subjects_*.pt")):  # the first run builds the subject cache alone
            run_fold(*jobs.pop(0), work, args.threads, args.reuse)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda j: run_fold(*j, work, args.threads, args.reuse), jobs))
        if not (work / "cost").is_dir():
            (work / "cost").mkdir(parents=True)
        for name in learners:
            out = work / f"setting{settings[0]}" / name / "fold0"
            cost_file = work / "cost" / f"{name}.json"
            if not (args.reuse and cost_file.is_file()):
                cost_file.write_text(json.dumps(adaptation_cost(name, out, work / "cache", args.threads), indent=2))
        results = _merged(collect(work, learners, settings, args), out_json)
        write_json(out_json, results, compact=True)
    md = table(results)
    update_readme_table(MARKER, md)
    if DOCS.is_file():
        update_readme_table(MARKER, md, readme=DOCS)
    print(md)


if __name__ == "__main__":
    main()
