"""What limits the few-shot CT Dice: prototype segmentation (``protoseg``, the bundle default) under training variants.

Every variant is the bundle's ``train.json`` with a few overrides (``VARIANTS``), meta-trained and evaluated exactly as
``bench_segmentation.py`` does (1-shot, the bundle's fixed evaluation episodes, so every variant sees the same
episodes), plus ``untrained``: the encoder at its initial weights, not meta-trained at all. For each variant the script
also measures how well the encoder's features single out a held-out organ: the AUC of the cosine similarity to the
support's foreground prototype, organ voxels against every other voxel inside the body of the query CT (0.5 is chance;
no threshold or background model can segment an organ whose AUC is near 0.5), averaged over liver, spleen and stomach
in both directions. Writes ``results/segmentation_ablations.json`` and the table in ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_segmentation_ablations.py --jobs 2          # every variant, 1 thread each
    python benchmarks/bench_segmentation_ablations.py --variants default,norm_batch --reuse
    python benchmarks/bench_segmentation_ablations.py --from-json       # only rewrite the README table
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
    run_bundle,
    trained,
    update_readme_table,
    write_json,
)

ROOT = BENCH_DIR.parent
BUNDLE = ROOT / "bundles" / "fewshot_segmentation_3d"
MARKER = "seg_ablations"
_IMPORTS = ("['$import os','$import torch','$import monai_metalearn',"
            "'$import monai_metalearn.apps.segmentation as app','$import _seg_ablation_helpers as ablate']")
#: the subjects with the structures labelled in CT-1 only as well (their own cache file)
_SUBJECTS = ["--subjects", "$app.load_segmentation_subjects(@data_dir, @sources, @train_structures + @val_structures "
             "+ @test_structures + list(ablate.CT1_ONLY_STRUCTURES), @pixdim, @progress, @cache_dir)"]
_AUGMENT = ["--train#episodes#episode_transform", "$ablate.intensity_augmented_patches(@patch_size, @n_patches)"]

#: name -> (what it changes, train.json overrides). ``untrained`` has no training run.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("bundle defaults (4 epochs x 25 meta-batches, 32^3 patches, instance norm)", []),
    "untrained": ("encoder at its initial weights (seed 0), no meta-training", []),
    "epochs_12": ("3x longer meta-training (12 epochs)", ["--epochs", "12"]),
    "patch_48": ("48^3 patches (144 mm of context at 3 mm)", ["--patch_size", "[48,48,48]"]),
    "norm_batch": ("BatchNorm instead of instance norm (batch statistics)", ["--backbone#norm", "batch"]),
    "norm_none": ("no normalisation layers (absolute intensities reach the features)", ["--backbone#norm", "$None"]),
    "intensity_aug": ("random non-linear intensity remap and gamma per subject in meta-training",
                      ["--imports", _IMPORTS, *_AUGMENT]),
    "structure_shift": ("intensity_aug + a random intensity offset per meta-train structure",
                        ["--imports", _IMPORTS, *_AUGMENT, "--train#episodes#data",
                         "$ablate.structure_shift_dataset(@subjects, @train_structures)"]),
    "supervoxels": ("self-supervised: SLIC supervoxels of the 2 CTs as pseudo-structures, two augmented views "
                    "(SSL-ALPNet style, no labels)",
                    ["--imports", _IMPORTS, *_AUGMENT, "--train#episodes#data", "$ablate.supervoxel_dataset(@subjects)",
                     "--train#episodes#structures", "$ablate.supervoxel_structures(@train#episodes#data)"]),
    "supervoxels_mixed": ("supervoxels + the labelled meta-train structures",
                          ["--imports", _IMPORTS, *_AUGMENT, "--train#episodes#data",
                           "$ablate.supervoxel_dataset(@subjects, include_labelled=True)",
                           "--train#episodes#structures",
                           "$ablate.supervoxel_structures(@train#episodes#data, @train_structures)"]),
    "same_subject_organs": ("+ 34 structures labelled in CT-1 only (kidneys, gallbladder, bowel, bladder, muscles, "
                            "bones ...), support and query patches from that one scan",
                            ["--imports", _IMPORTS, *_SUBJECTS, "--train#episodes#data",
                             "$ablate.same_subject_dataset(@subjects)", "--train#episodes#structures",
                             "$@train_structures + list(ablate.CT1_ONLY_STRUCTURES)"]),
    "same_subject_organs_aug": ("same_subject_organs + intensity_aug",
                                ["--imports", _IMPORTS, *_SUBJECTS, *_AUGMENT, "--train#episodes#data",
                                 "$ablate.same_subject_dataset(@subjects)", "--train#episodes#structures",
                                 "$@train_structures + list(ablate.CT1_ONLY_STRUCTURES)"]),
}

_INIT_SCRIPT = r"""
import sys, torch
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config(f"{sys.argv[1]}/configs/train.json")
torch.manual_seed(0)
torch.save({"learner": parser.get_parsed_content("learner").state_dict()}, sys.argv[2])
"""

#: Reads (or builds) the subjects cache, then for each CT: the median intensity (HU, within the bundle's CT window)
#: of structures that show its contrast phase (arteries and veins are bright after contrast injection, muscle is
#: not), and the Dice of a reference without any learning: the whole body (the largest connected component above the
#: CT window's floor) taken as the mask of each held-out organ.
_CACHE_SCRIPT = r"""
import json, sys, torch
from monai.bundle import ConfigParser
from _seg_ablation_helpers import body_mask, organ_mask
from monai_metalearn.apps.segmentation import CT_WINDOW, largest_component
from monai_metalearn.metrics import binary_dice
parser = ConfigParser()
parser.read_config(f"{sys.argv[1]}/configs/train.json")
parser["cache_dir"], parser["progress"] = sys.argv[2], False
lo, hi = CT_WINDOW
contrast, whole_body = {}, {}
for s in parser.get_parsed_content("subjects"):
    if s.get("modality") != "CT":
        continue
    contrast[s["subject"]] = {
        name: float(s["image"][organ_mask(s, name)].median()) * (hi - lo) + lo
        for name in sys.argv[3].split(",") if name in s["structures"]
    }
    body = largest_component(body_mask(s["image"])[None].float())
    whole_body[s["subject"]] = {
        organ: float(binary_dice(body, organ_mask(s, organ)[None].float()))
        for organ in parser.get_parsed_content("test_ct_structures") if organ in s["structures"]
    }
print("RESULT " + json.dumps({"contrast_hu": contrast, "whole_body_dice": whole_body}))
"""
CONTRAST_STRUCTURES = ("aorta", "portal_vein_and_splenic_vein", "inferior_vena_cava", "liver", "spleen",
                       "autochthon_left")

#: AUC of the cosine similarity to the support's foreground prototype: organ voxels vs the rest of the body.
_AUC_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
import monai_metalearn.apps.segmentation as app
from _seg_ablation_helpers import body_mask, organ_mask
bundle, ckpt, cache, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
p = ConfigParser(); p.read_config(f"{bundle}/configs/train.json")
p["bundle_root"], p["cache_dir"], p["progress"] = bundle, cache, False
for key, value in overrides.items():
    p[key] = value
learner = p.get_parsed_content("learner"); app.load_learner(learner, ckpt, "cpu"); learner.eval()
subjects = {s["subject"]: s for s in p.get_parsed_content("subjects")}
patch = tuple(p.get_parsed_content("patch_size"))
window = SlidingWindowInferer(patch, sw_batch_size=4, overlap=0.25, mode="gaussian")
support_patches = app.patch_transforms(patch, p.get_parsed_content("eval_patches"))
out = {}
with torch.no_grad():
    for organ in ("liver", "spleen", "stomach"):
        for a, b in (("totalseg_ct1", "totalseg_ct2"), ("totalseg_ct2", "totalseg_ct1")):
            sa, sb = subjects[a], subjects[b]
            support_patches.set_random_state(0)
            patches = support_patches({"image": sa["image"], "label": organ_mask(sa, organ).float()})
            sx = torch.stack([q["image"] for q in patches]); sy = torch.stack([q["label"] for q in patches]) > 0
            fs = F.normalize(learner.embed(sx), dim=1).movedim(1, -1)
            fg = F.normalize(fs[sy[:, 0]].mean(0), dim=0)
            fq = F.normalize(window(sb["image"][None].float(), learner.embed)[0], dim=0)
            score = torch.einsum("f...,f->...", fq, fg).reshape(-1)
            truth = organ_mask(sb, organ)[0].reshape(-1)
            body = body_mask(sb["image"][0]).reshape(-1) | truth
            s, t = score[body], truth[body]
            ranks = torch.empty_like(s); ranks[s.argsort()] = torch.arange(1, len(s) + 1, dtype=s.dtype)
            n1, n0 = int(t.sum()), int((~t).sum())
            out[f"{organ} {a} -> {b}"] = float((ranks[t].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
print("RESULT " + json.dumps(out))
"""


def _auc(out: Path, cache: Path, args: list[str], threads: int) -> dict:
    keep = {"--backbone#norm", "--patch_size"}
    overrides = {k[2:]: (json.loads(v) if v.startswith("[") else v) for k, v in zip(args[::2], args[1::2]) if k in keep}
    proc = subprocess.run([sys.executable, "-c", _AUC_SCRIPT, str(BUNDLE), str(out / "model.pt"), str(cache),
                           json.dumps(overrides)], cwd=BUNDLE, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"feature AUC of {out} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_variant(name: str, work: Path, cache: Path, threads: int, reuse: bool) -> dict:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    args = VARIANTS[name][1]
    train_s = 0.0
    if name == "untrained":
        if not (reuse and (out / "model.pt").is_file()):
            subprocess.run([sys.executable, "-c", _INIT_SCRIPT, str(BUNDLE), str(out / "model.pt")], check=True,
                           cwd=BUNDLE, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    elif reuse and trained(out):
        train_s = log_seconds(out / "train.log")
    else:
        epochs = args[args.index("--epochs") + 1] if "--epochs" in args else "4"
        # meta-validation only after the last epoch: the variants are compared on the final checkpoint
        train_s = run_bundle(BUNDLE, ["train.json"], out, cache, threads, "--val_interval", epochs, *args)
    if not (reuse and (out / "metrics.json").is_file()):
        run_bundle(BUNDLE, ["train.json", "evaluate.json"], out, cache, threads, "--test_shots", "[1]", *args)
    metrics = json.loads((out / "metrics.json").read_text())
    if reuse and (out / "auc.json").is_file():
        auc = json.loads((out / "auc.json").read_text())
    else:
        auc = _auc(out, cache, args, threads)
        (out / "auc.json").write_text(json.dumps(auc, indent=2))
    ct = metrics["by_protocol"]["ct_cross_subject"]["1"]["dice"]
    print(f"{name}: CT 1-shot Dice {100 * ct['mean']:.1f} ± {100 * ct['ci95']:.1f}, "
          f"feature AUC {sum(auc.values()) / len(auc):.3f} (train {train_s:.0f} s)", flush=True)
    return {"variant": name, "what": VARIANTS[name][0], "overrides": args, "train_seconds": round(train_s, 1),
            "metrics": metrics, "auc": auc}


def _dice(metrics: dict, protocol: str, structure: str | None = None) -> str:
    entry = metrics["by_protocol"].get(protocol, {}).get("1")
    if entry is None:
        return "n/a"
    d = entry["dice"] if structure is None else entry.get("per_structure", {}).get(structure)
    return dice_cell(d, show_n=False, min_n_for_ci=3)


def table(results: dict) -> str:
    rows = ["| variant | what changes | CT 1-shot Dice | liver | spleen | stomach | label maps → T1 1-shot "
            "| feature AUC (mean) | liver AUC | train s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        m, auc = r["metrics"], r["auc"]
        liver = [v for k, v in auc.items() if k.startswith("liver")]
        rows.append(
            f"| {r['variant']} | {r['what']} | {_dice(m, 'ct_cross_subject')} "
            + " ".join(f"| {_dice(m, 'ct_cross_subject', s)}" for s in ("liver", "spleen", "stomach"))
            + f" | {_dice(m, 'brain_labelmaps_to_t1')} | {sum(auc.values()) / len(auc):.2f} "
            f"| {sum(liver) / len(liver):.2f} | {r['train_seconds']:.0f} |"
        )
    body = results.get("whole_body_dice")
    if body:  # each organ queried in each CT equally often, as in the evaluation episodes
        per_organ = {o: [per[o] for per in body.values() if o in per] for o in next(iter(body.values()))}
        mean = sum(sum(v) for v in per_organ.values()) / sum(len(v) for v in per_organ.values())
        cells = " ".join(f"| {100 * sum(per_organ[o]) / len(per_organ[o]):.1f}" if o in per_organ else "| n/a"
                         for o in ("liver", "spleen", "stomach"))
        rows.append(f"| whole body | reference without learning: the query's whole body (largest component above "
                    f"-238 HU) as the organ mask | {100 * mean:.1f} {cells} | n/a | n/a | n/a | 0 |")
    rows.append("")
    contrast = results.get("contrast_hu", {})
    if contrast:
        names = list(dict.fromkeys(n for per in contrast.values() for n in per))
        rows.append("Contrast phase of the two CTs: median HU of each structure (within the CT window "
                    "[-250, 350]) from the label maps:")
        rows.append("")
        rows.append("| subject | " + " | ".join(names) + " |")
        rows.append("|---|" + "---:|" * len(names))
        for subject, per in contrast.items():
            rows.append(f"| {subject} | " + " | ".join(f"{per[n]:.0f}" if n in per else "n/a" for n in names) + " |")
        rows.append("")
    rows.append(
        "Protoseg, Dice % of whole query volumes, 1-shot, mean ± 95% CI over the bundle's fixed evaluation episodes "
        "(16 CT episodes: 4 per organ, both directions; 16 brain episodes); every variant sees the same episodes. "
        "Feature AUC: how well the cosine similarity to the support's foreground prototype ranks the organ's voxels "
        "above the other voxels inside the body of the query CT (0.5 = chance), mean over liver, spleen and stomach in "
        "both directions. Brain support images are SYNTHETIC (from the real SynthSeg label maps). Variants are "
        "`train.json` overrides listed in `VARIANTS` of `bench_segmentation_ablations.py`; the intensity and "
        "supervoxel variants use `_seg_ablation_helpers.py`. Measured "
        f"{results['date']} on {results['machine'].get('cpu_count')} CPU cores ({results['jobs']} runs in parallel, "
        f"{results['threads']} thread(s) each)."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--work", default=str(BENCH_DIR / "_work" / "segmentation_ablations"))
    parser.add_argument("--reuse", action="store_true", help="skip what --work already holds for a variant")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the README table")
    args = parser.parse_args()
    out_json = RESULTS_DIR / "segmentation_ablations.json"
    if args.from_json:
        update_readme_table(MARKER, table(json.loads(out_json.read_text())))
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not os.environ.get("MONAI_DATA_DIRECTORY"):
        raise SystemExit("set MONAI_DATA_DIRECTORY to the data folder (the Makefile's default is ../shared/data)")
    work = Path(args.work)
    # the bundle runs import _seg_ablation_helpers from this folder
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
    # read (or build) the subjects cache once, before parallel runs would each build it
    cache = work.parent / "segmentation" / "cache"
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(BUNDLE), str(cache), ",".join(CONTRAST_STRUCTURES)],
                          check=True, cwd=BUNDLE, capture_output=True, text=True)
    reference = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        runs = list(pool.map(lambda n: run_variant(n, work, cache, args.threads, args.reuse), names))
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "jobs": args.jobs,
               "threads": args.threads, **reference, "runs": runs}
    write_json(out_json, results)
    update_readme_table(MARKER, table(results))
    print(table(results))


if __name__ == "__main__":
    main()
