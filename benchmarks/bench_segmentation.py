"""Few-shot segmentation Dice of every learner on held-out structures, through the segmentation bundle.

Each learner is meta-trained with the bundle's default ``train.json`` (``python -m monai.bundle run``, exactly what a
user runs) and evaluated with ``evaluate.json``: whole query volumes segmented with a sliding window after adapting
on patches of the support scans, in two protocols:

* ``ct_cross_subject``: held-out abdominal organs (liver, spleen, stomach, pancreas), support from one real CT and
  query the other (CT-1 -> CT-2 and CT-2 -> CT-1), 1-shot (only 2 CT subjects carry these organs);
* ``brain_labelmaps_to_t1``: held-out brain structures, support images SYNTHESIZED from the real SynthSeg label maps,
  query the real T1 MRI, 1-shot and 5-shot.

Then, per learner, the adaptation cost on one fixed 1-shot CT episode: time (median of repeats) and the peak memory
added by adaptation (CPU: growth of the process's maximum resident set, measured in a fresh process; CUDA: peak
allocated). Writes ``results/segmentation.json`` and the tables in ``benchmarks/README.md`` and
``bundles/fewshot_segmentation_3d/docs/README.md``.

Usage::

    python benchmarks/bench_segmentation.py                          # all learners, bundle defaults
    python benchmarks/bench_segmentation.py --learners protoseg,maml --jobs 1 --reuse
    python benchmarks/bench_segmentation.py --collect                # tables from the learners finished in --work
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
LEARNERS = ("protoseg", "finetune", "scratch", "maml", "fomaml", "anil", "reptile")
MARKER = "dice"
#: SSL-ALPNet (Ouyang et al., ECCV 2020), 1-shot abdominal CT organs, 2D, mean Dice (%) of its setting.
ALPNET_ANCHOR = 73.0


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
seg.load_learner(learner, ckpt, "cpu" if not torch.cuda.is_available() else "cuda")
device = next(learner.parameters()).device
dataset = parser.get_parsed_content("dataset")
patch, n = parser["patch_size"], parser["eval_patches"]
episodes = SegmentationEpisodeDataset(dataset, ["liver"], 1, 1, 1, support_transform=seg.patch_transforms(patch, n),
                                      query_transform=seg.volume_transforms(), query_subjects=["totalseg_ct2"])
sx, sy, qx, qy = default_prepare_episode(episodes[0], device)
inferer = seg.sliding_window_inferer(patch)
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
out = {"adapt_seconds": adapt, "segment_seconds": infer, "support_patches": int(sx.shape[0]),
       "query_shape": list(qx.shape[2:]), "device": device.type,
       "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024}
if device.type == "cuda":
    out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
print("RESULT " + json.dumps(out))
"""


def adaptation_cost(name: str, out: Path, cache: Path, threads: int, repeats: int = 3) -> dict:
    """Adaptation time and memory of a trained learner on one fixed 1-shot CT episode (liver, CT-1 -> CT-2)."""
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
    rows = ["| learner | adapt s (median of 3) | segment CT-2 s | peak memory growth MiB | support patches |",
            "|---|---:|---:|---:|---:|"]
    for r in results["runs"]:
        c = r["cost"]
        rows.append(f"| {r['learner']} | {c['adapt_median_s']:.2f} | {c['segment_median_s']:.2f} "
                    f"| {c['peak_rss_growth_mib']:.0f} | {c['support_patches']} |")
    rows.append("")
    rows.append(
        f"One 1-shot episode (liver, support CT-1, query the whole CT-2 at 3 mm), bundle defaults, initial weights "
        f"(the cost does not depend on them), each learner in a fresh process, {results['threads']} torch thread(s), "
        f"{results['machine'].get('cpu_count')} CPU cores, {results['date']}; device: {results['runs'][0]['cost']['device']}. "
        "Memory: growth of the process's maximum resident set during adaptation and segmentation. No GPU was lent to "
        "this run; on CUDA the script reports peak allocated memory instead."
    )
    return "\n".join(rows)


#: Extra ``train.json`` overrides per learner. The from-scratch baseline has nothing to meta-train (its meta-steps are
#: no-ops), so one epoch, without validation, only writes the checkpoint that evaluate.json loads.
TRAIN_ARGS = {"scratch": ["--epochs", "1"]}
#: Extra ``evaluate.json`` overrides per learner. The from-scratch baseline fine-tunes a fresh UNet for 60 steps on
#: every support set: about 3 minutes per 5-shot brain episode (40 patches) on one core, so the benchmark measures it
#: 1-shot only (the issue's benchmark is 1-shot); ``evaluate.json`` itself still runs both.
EVAL_ARGS = {"scratch": ["--test_shots", "[1]"]}


def run_learner(name: str, work: Path, threads: int, reuse: bool, test_episodes: int | None) -> dict:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    if reuse and trained(out):
        train_s = log_seconds(out / "train.log")
        print(f"{name}: reusing the checkpoint trained earlier ({train_s:.0f} s)", flush=True)
    else:
        train_s = run_bundle(BUNDLE, ["train.json"], out, work / "cache", threads, "--learner_name", name,
                             *TRAIN_ARGS.get(name, []))
    extra = [] if test_episodes is None else ["--test_episodes", str(test_episodes)]
    if not (reuse and (out / "metrics.json").is_file()):
        run_bundle(BUNDLE, ["train.json", "evaluate.json"], out, work / "cache", threads, "--learner_name", name, *extra,
                   *EVAL_ARGS.get(name, []))
    cost = adaptation_cost(name, out, work / "cache", threads)
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"{name}: CT 1-shot Dice {_cell(metrics, 'ct_cross_subject', '1')}, "
          f"brain->T1 1-shot {_cell(metrics, 'brain_labelmaps_to_t1', '1')} (train {train_s:.0f} s)", flush=True)
    return {"learner": name, "train_seconds": round(train_s, 1),
            "evaluate_seconds": round(log_seconds(out / "evaluate.log"), 1), "metrics": metrics, "cost": cost}


def _cell(metrics: dict, protocol: str, k: str, direction: str | None = None, part: str | None = None) -> str:
    """``part``: None (the Dice), ``"slab"`` (structure slices only) or ``"raw"`` (before mask post-processing)."""
    entry = metrics.get("by_protocol", {}).get(protocol, {}).get(k)
    if entry is not None and part:
        entry = entry.get(part)
    if entry is None:
        return "n/a"
    return dice_cell(entry["dice"] if direction is None else entry.get("per_direction", {}).get(direction))


def table(results: dict) -> str:
    ct12, ct21 = "totalseg_ct1 -> totalseg_ct2", "totalseg_ct2 -> totalseg_ct1"
    rows = ["| learner | CT-1 → CT-2 | CT-2 → CT-1 | CT 1-shot (all) | CT 1-shot, organ slices "
            "| CT 1-shot, all components | label maps → T1, 1-shot | label maps → T1, 5-shot "
            "| T1 1-shot, structure slices | adapt s (CPU) | adapt peak MiB | train s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        m, c = r["metrics"], r.get("cost", {})
        rows.append(
            f"| {r['learner']} | {_cell(m, 'ct_cross_subject', '1', ct12)} | {_cell(m, 'ct_cross_subject', '1', ct21)} "
            f"| {_cell(m, 'ct_cross_subject', '1')} | {_cell(m, 'ct_cross_subject', '1', part='slab')} "
            f"| {_cell(m, 'ct_cross_subject', '1', part='raw')} | {_cell(m, 'brain_labelmaps_to_t1', '1')} "
            f"| {_cell(m, 'brain_labelmaps_to_t1', '5')} "
            f"| {_cell(m, 'brain_labelmaps_to_t1', '1', part='slab')} | {c.get('adapt_median_s', float('nan')):.1f} "
            f"| {c.get('peak_rss_growth_mib', float('nan')):.0f} | {r['train_seconds']:.0f} |"
        )
    rows.append("")
    rows.append("Per structure (1-shot Dice %, mean ± 95% CI over episodes, episode count in brackets; no CI below 3 "
                "episodes):")
    rows.append("")
    structures: list[str] = []
    for r in results["runs"]:
        for s in r["metrics"]["by_shot"].get("1", {}).get("per_structure", {}):
            if s not in structures:
                structures.append(s)
    rows.append("| structure | " + " | ".join(r["learner"] for r in results["runs"]) + " |")
    rows.append("|---|" + "---:|" * len(results["runs"]))
    for s in structures:
        cells = []
        for r in results["runs"]:
            d = r["metrics"]["by_shot"].get("1", {}).get("per_structure", {}).get(s)
            # a t-interval over 2 episodes (t = 12.7) says only that 2 episodes are too few: no CI below 3
            cells.append(dice_cell(d, min_n_for_ci=3))
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    rows.append("")
    measured = {r["learner"] for r in results["runs"]}
    notes = [f"{name}: {' '.join(args)} for training" for name, args in TRAIN_ARGS.items() if name in measured]
    notes += [f"{name}: {' '.join(args)} in evaluation" for name, args in EVAL_ARGS.items() if name in measured]
    if notes:
        rows.append("Per-learner overrides of the bundle defaults (see `TRAIN_ARGS` / `EVAL_ARGS` in "
                    f"`bench_segmentation.py`): {'; '.join(notes)}.")
        rows.append("")
    if results.get("not_measured"):
        rows.append(f"Not measured in this run (CPU time): {', '.join(results['not_measured'])}.")
        rows.append("")
    cfg = results["config"]
    rows.append(
        "Dice % of whole query volumes (sliding window at the training patch size, 3 mm), mean ± 95% t-interval over "
        "episodes (episode count in brackets); the 'slices' columns score only the axial slices that hold the "
        "structure (the 3D analogue of the 2D protocol behind the SSL-ALPNet figure; n/a where not recorded). Every "
        "predicted mask is reduced to its largest connected component (`keep_largest_component`, the default); "
        "'all components' is the CT Dice without that step (n/a for runs without it). CT: held-out organs "
        f"({', '.join(cfg['test_ct_structures'])}) of 2 real subjects (TotalSegmentator CT-1 and CT-2; their label "
        "maps are TotalSegmentator outputs, not manual labels; CT-2 is a 20-slice slab, so its organs are partial). "
        f"Brain: held-out structures ({', '.join(cfg['test_brain_structures'])}); support images are SYNTHETIC, drawn "
        "from the 20 real SynthSeg label maps, the query is the real voxelmorph T1. Meta-training: "
        f"{len(cfg['train_structures'])} structures of real CT, the real T1 and SYNTHETIC images of the SynthSeg maps; "
        f"bundle defaults ({cfg['epochs']} x {cfg['episodes_per_epoch']} meta-batches of {cfg['meta_batch_size']} "
        f"episodes, {cfg['n_patches']} patches of {cfg['patch_size']} per subject). Adaptation cost: one 1-shot "
        f"episode (liver, CT-1 -> CT-2, {cfg['eval_patches']} support patches), median of 3; peak MiB = growth of the "
        f"process's maximum resident memory during adaptation and segmentation. Measured {results['date']} on "
        f"{results['machine'].get('cpu_count')} CPU cores ({results['jobs']} runs in parallel, {results['threads']} "
        f"thread(s) each). Anchor: SSL-ALPNet reports about {ALPNET_ANCHOR:.0f} mean Dice on abdominal CT organs, "
        "1-shot, in 2D with many more training subjects; with 2 subjects the CIs measure episode-to-episode spread, "
        "not population uncertainty."
    )
    return "\n".join(rows)


def _config() -> dict:
    cfg = json.loads((BUNDLE / "configs" / "train.json").read_text())
    cfg.update(json.loads((BUNDLE / "configs" / "evaluate.json").read_text()))
    keys = ("train_structures", "val_structures", "test_ct_structures", "test_brain_structures", "sources", "pixdim",
            "patch_size", "n_patches", "eval_patches", "epochs", "episodes_per_epoch", "meta_batch_size", "channels",
            "feature_channels", "learner_defaults", "test_shots", "test_episodes")
    return {k: cfg[k] for k in keys}


def collect(work: Path, learners: list[str], args: argparse.Namespace) -> dict:
    runs = []
    for name in learners:
        out = work / name
        if not (out / "metrics.json").is_file():
            print(f"{name}: not finished, left out")
            continue
        cost = json.loads((out / "cost.json").read_text()) if (out / "cost.json").is_file() else {}
        runs.append({"learner": name, "train_seconds": round(log_seconds(out / "train.log"), 1),
                     "evaluate_seconds": round(log_seconds(out / "evaluate.log"), 1),
                     "metrics": json.loads((out / "metrics.json").read_text()), "cost": cost})
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "jobs": args.jobs, "threads": args.threads,
            "config": _config(), "runs": runs,
            "not_measured": [n for n in learners if n not in {r["learner"] for r in runs}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--jobs", type=int, default=1, help="learners trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--test_episodes", type=int, default=None, help="default: evaluate.json's")
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
    if args.from_json:
        results = json.loads(out_json.read_text())
    elif args.collect:
        results = collect(Path(args.work), learners, args)
        write_json(out_json, results)
    else:
        if not os.environ.get("MONAI_DATA_DIRECTORY"):
            raise SystemExit("set MONAI_DATA_DIRECTORY")
        work = Path(args.work)
        runs = []
        if not any((work / "cache").glob("subjects_*.pt")):  # the first run builds the subject cache alone
            runs.append(run_learner(learners.pop(0), work, args.threads, args.reuse, args.test_episodes))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs += pool.map(lambda n: run_learner(n, work, args.threads, args.reuse, args.test_episodes), learners)
        results = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "jobs": args.jobs,
                   "threads": args.threads, "config": _config(), "runs": runs}
        write_json(out_json, results)
    md = table(results)
    update_readme_table(MARKER, md)
    if DOCS.is_file():
        update_readme_table(MARKER, md, readme=DOCS)
    print(md)


if __name__ == "__main__":
    main()
