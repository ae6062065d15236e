"""Registration-based few-shot segmentation on the project's protocols: the atlas learners (K = 1, multi-atlas K = 3
and 5 with majority / locally weighted / STAPLE fusion), elastix on the same pairs, and the two trivial references.

For every query subject of a protocol (the bundle's folds and protocols, ``monai_metalearn.apps.protocols``), the
atlases are the next K subjects of the protocol's support list after the query, cyclically (never the query): a
fixed rule, the same for every method, nothing chosen by looking at results. Each (atlas, query) pair is registered
once, through the product's own learner (``AtlasSegmenter``, registrations cached by content) and every structure of
the protocol carried; every predicted mask is reduced to its largest connected component, as the bundle does. Scans
are loaded exactly as the segmentation bundle loads them (3 mm; ACDC 1.5 x 1.5 x 3 mm; LPBA40 1.5 mm; intensities
per item kind).

Per query, the results go to ``--work/<protocol>/<query>.json`` (a re-run skips what is there), so several
processes can share the work (``--protocols``, ``--queries``); ``--collect`` writes ``results/registration.json`` and
the README table (marker ``registration``).

Usage::

    python benchmarks/bench_registration.py --protocols abdominal_ct --k 1
    python benchmarks/bench_registration.py --protocols abdominal_ct --k 5 --queries 6 --elastix 6
    python benchmarks/bench_registration.py --collect
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, RESULTS_DIR, machine_info, update_readme_table, write_json  # noqa: E402

ROOT = BENCH_DIR.parent
BUNDLE = ROOT / "bundles" / "fewshot_segmentation_3d"
PROTOCOLS = ("abdominal_ct", "abdominal_mr", "abdominal_ct_to_mr", "heart", "brain")
MARKER = "registration"
#: method -> (K, fusion); K = 1 needs no fusion
METHODS = {"atlas": (1, "majority"), "atlas_em": (1, "em"), "atlas_st": (1, "selftrain"), "majority3": (3, "majority"), "weighted3": (3, "weighted"),
           "staple3": (3, "staple"), "majority5": (5, "majority"), "weighted5": (5, "weighted"),
           "staple5": (5, "staple"), "em5": (5, "em")}


def _config() -> dict:
    return json.loads((BUNDLE / "configs" / "train.json").read_text())


def load(protocols: list[str]):
    """Subjects (as the bundle loads them) and the protocols' episodes definitions, over both folds."""
    from monai_metalearn.apps.protocols import segmentation_protocols
    from monai_metalearn.apps.segmentation import load_segmentation_subjects

    cfg = _config()
    structures = sorted({s for k in ("test_ct_structures", "test_heart_structures", "test_brain_structures")
                         for s in cfg[k]})
    subjects = load_segmentation_subjects(
        os.environ["MONAI_DATA_DIRECTORY"], cfg["sources"], structures, cfg["pixdim"], progress=False,
        cache_dir=BENCH_DIR / "_work" / "registration" / "cache", source_pixdim=cfg["source_pixdim"],
        source_options=cfg["source_options"])
    runs = []
    for fold in range(len(cfg["folds"]["btcv_sabs"])):
        for proto in segmentation_protocols("all", subjects, cfg["folds"], fold):
            if proto["name"] not in protocols:
                continue
            # CHAOS and ACDC are never trained on: their queries are the same in both folds, run them once
            if fold > 0 and not any(q in set(cfg["folds"].get(src, [[]] * 2)[fold])
                                    for src in cfg["folds"] for q in proto["query_subjects"]):
                continue
            runs.append({**proto, "fold": fold})
    return subjects, runs


def run_query(proto: dict, query: str, by_id: dict, k_max: int, n_elastix: int, index: int, threads: int,
              only: set[str] | None = None) -> dict:
    from monai_metalearn.apps.pairs import next_subjects, pair_dice, subject_mask
    from monai_metalearn.apps.segmentation import _protocol_geometry, largest_component
    from monai_metalearn.learners import (
        AtlasIntensitySegmenter,
        AtlasSegmenter,
        AtlasSelfTrainingSegmenter,
        BoxAlignedReference,
        WholeBodyReference,
    )

    torch.set_num_threads(threads)
    q = by_id[query]
    names = next_subjects(query, proto["support_subjects"], k_max)
    structures = [s for s in proto["structures"] if s in q["structures"]]
    atlas = AtlasSegmenter(cache_size=16)
    atlas.prepare_protocol(**_protocol_geometry([by_id[n] for n in names] + [q], names, [query]))
    em = AtlasIntensitySegmenter(cache_size=16)  # the hybrids, on the same (cached) registrations
    st = AtlasSelfTrainingSegmenter(cache_size=16)
    for hybrid in (em, st):
        hybrid.spacing, hybrid.config, hybrid._cache = atlas.spacing, atlas.config, atlas._cache
    hybrids = {"em": em, "selftrain": st}
    qx = q["image"][None]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"protocol": proto["name"], "fold": proto["fold"], "query": query, "atlases": names,
           "similarity": atlas.config.similarity, "dice": {}, "seconds": {}}
    t0 = time.perf_counter()
    for name in names:  # register every atlas once (cached for every structure and fusion)
        atlas.register_pair(by_id[name]["image"], q["image"])
    out["seconds"]["registration_per_atlas"] = round((time.perf_counter() - t0) / max(1, len(names)), 1)
    out["peak_rss_growth_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    methods = {m: v for m, v in METHODS.items() if v[0] <= len(names) and (only is None or m in only)}
    for s in structures:
        truth = subject_mask(q, s)
        row = {}
        usable = [n for n in names if s in by_id[n]["structures"]]
        for m, (k, fusion) in methods.items():
            if len(usable) < k:
                continue
            learner = hybrids.get(fusion, atlas)
            if fusion not in hybrids:
                atlas.fusion = fusion
            sup = usable[:k]
            t_m = time.perf_counter()
            pred = learner.adapt([by_id[n]["image"] for n in sup], [subject_mask(by_id[n], s) for n in sup])(qx).argmax(1, True)
            row[m] = pair_dice(largest_component(pred.to(torch.uint8)), truth[None])
            if fusion in hybrids:  # time of the method on top of the (cached) registration
                out["seconds"].setdefault(f"{m}_per_structure", []).append(round(time.perf_counter() - t_m, 1))
        first = usable[:1]
        if first and only is None:
            for m, ref in (("wholebody", WholeBodyReference()), ("boxaligned", BoxAlignedReference())):
                pred = ref.adapt([by_id[first[0]]["image"]], [subject_mask(by_id[first[0]], s)])(qx).argmax(1, True)
                row[m] = pair_dice(largest_component(pred.to(torch.uint8)), truth[None])
        out["dice"][s] = row
    if index < n_elastix and names:
        from monai.data import MetaTensor

        from monai_metalearn.registration.elastix import elastix_available, elastix_register

        if elastix_available():
            sp = torch.tensor([*atlas.spacing, 1.0], dtype=torch.float64)
            meta = lambda x: MetaTensor(x.float(), affine=torch.diag(sp))  # noqa: E731
            a = by_id[names[0]]
            res = elastix_register(meta(a["image"]), meta(q["image"]), threads=threads)
            warped = res.warp_label(meta(a["label"].float()))
            out["seconds"]["elastix"] = round(res.seconds, 1)
            for s in structures:
                if s in a["structures"]:
                    from monai_metalearn.transforms import resolve_structure, structure_mask

                    ids = resolve_structure(s, a["structures"])[1]
                    pred = structure_mask(warped.as_tensor().round().to(torch.int16), ids, repr(s))
                    out["dice"][s]["elastix"] = pair_dice(largest_component(pred[None].to(torch.uint8))[0], subject_mask(q, s))
    out["seconds"]["query"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------ tables
ORDER = ("atlas", "atlas_em", "atlas_st", "majority3", "weighted3", "staple3", "majority5", "weighted5", "staple5", "em5", "elastix",
         "boxaligned", "wholebody")
MAIN4 = ("liver", "spleen", "kidney_left", "kidney_right")


def summarize(records: list[dict]) -> dict:
    from monai_metalearn.metrics import mean_ci95_subjects

    out: dict = {}
    for proto in PROTOCOLS:
        recs = [r for r in records if r["protocol"] == proto]
        if not recs:
            continue
        entry: dict = {"per_structure": {}, "overall": {}, "n_queries": len(recs),
                       "seconds_per_atlas": sorted(r["seconds"]["registration_per_atlas"] for r in recs),
                       "elastix_seconds": sorted(r["seconds"]["elastix"] for r in recs if "elastix" in r["seconds"]),
                       "peak_rss_growth_mib": max(r["peak_rss_growth_mib"] for r in recs)}
        structures = sorted({s for r in recs for s in r["dice"]})
        for m in ORDER:
            for s in structures:
                vals = [(r["dice"][s][m], r["query"]) for r in recs if m in r["dice"].get(s, {})]
                if vals:
                    entry["per_structure"].setdefault(s, {})[m] = mean_ci95_subjects(*zip(*vals))
            # overall: per query, the mean over its structures (only queries where the method ran on all of them)
            per_q = [(sum(r["dice"][s][m] for s in r["dice"]) / len(r["dice"]), r["query"]) for r in recs
                     if r["dice"] and all(m in r["dice"][s] for s in r["dice"])]
            if per_q:
                entry["overall"][m] = mean_ci95_subjects(*zip(*per_q))
        # the same queries as elastix: every method on exactly the pairs elastix ran on (paired comparison)
        paired = [r for r in recs if r["dice"] and all("elastix" in v for v in r["dice"].values())]
        if paired:
            entry["paired_with_elastix"] = {}
            for m in ORDER:
                per_q = [(sum(r["dice"][s][m] for s in r["dice"]) / len(r["dice"]), r["query"]) for r in paired
                         if all(m in r["dice"][s] for s in r["dice"])]
                if len(per_q) == len(paired):
                    entry["paired_with_elastix"][m] = mean_ci95_subjects(*zip(*per_q))
        out[proto] = entry
    return out


def _cell(d: dict | None) -> str:
    if not d:
        return ""
    ci = d.get("ci95")
    return f"{100 * d['mean']:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "") + f" [{d['n_subjects']}]"


def _added(results: dict) -> str:
    added = results.get("added", {})
    if not added:
        return "all methods measured together"
    return ", ".join(f"`{m}` added on {d} on the same queries and first atlases (re-registered; `atlas` re-scored "
                     f"as a check)" for m, d in added.items())


def table(results: dict) -> str:
    rows = []
    summary = results["summary"]
    methods = [m for m in ORDER if any(m in e["overall"] or any(m in v for v in e["per_structure"].values())
                                       for e in summary.values())]
    rows.append("| protocol | structure | " + " | ".join(methods) + " |")
    rows.append("|---|---|" + "---:|" * len(methods))
    for proto, e in summary.items():
        rows.append(f"| {proto} | **mean** | " + " | ".join(_cell(e["overall"].get(m)) for m in methods) + " |")
        for s, by_m in e["per_structure"].items():
            rows.append(f"| {proto} | {s} | " + " | ".join(_cell(by_m.get(m)) for m in methods) + " |")
    for proto, e in summary.items():
        if e.get("paired_with_elastix"):
            rows.append(f"| {proto} | **mean, elastix's queries** | "
                        + " | ".join(_cell(e["paired_with_elastix"].get(m)) for m in methods) + " |")
    rows.append("")
    rows.append("| protocol | queries | s / atlas registration (median, min-max) | elastix s / pair (median) | "
                "peak RSS growth MiB |")
    rows.append("|---|---:|---:|---:|---:|")
    for proto, e in summary.items():
        s = e["seconds_per_atlas"]
        el = e["elastix_seconds"]
        rows.append(f"| {proto} | {e['n_queries']} | {s[len(s) // 2]:.0f} ({s[0]:.0f}-{s[-1]:.0f}) | "
                    + (f"{el[len(el) // 2]:.0f} [{len(el)} pairs]" if el else "not run") + f" | "
                    f"{e['peak_rss_growth_mib']:.0f} |")
    rows.append("")
    rows.append(
        "1-shot (`atlas`) and K-shot (`majority3` = K 3 majority vote, `weighted3` = locally weighted voting, "
        "`staple3` = STAPLE; 5: K = 5; `atlas_em` / `em5`: the hybrid `AtlasIntensitySegmenter`, the carried masks' "
        "mean as the spatial prior of an intensity model learned on the query by EM; `atlas_st`: the hybrid "
        "`AtlasSelfTrainingSegmenter`, registration as a data engine: the carried mask's confident voxels and the "
        "registered atlas image train a per-voxel model on the query, which corrects the carried prior; "
        f"{_added(results)}) whole-volume Dice %, mean ± 95% t-interval over query subjects [number of "
        "query subjects]; **mean**: per query, the mean over the protocol's structures, then over queries. Atlases: "
        "the next K subjects of the protocol's support list after the query (fold test subjects for BTCV and LPBA40; "
        "CHAOS and ACDC, never trained on, once). `elastix`: itk-elastix default affine + B-spline maps from "
        "the centres of gravity, on the first atlas of the first queries only (see the timing table); the row *mean, elastix's queries* compares every method on exactly those queries. `boxaligned` / "
        "`wholebody`: the trivial references with the first atlas, same queries. Registration settings: the "
        "defaults of `RegistrationConfig` (4 mm finest level) with each source's own settings "
        "(`Source.registration`: for ACDC the initial search tries in-plane rotations every 30 degrees, as short-axis "
        "stacks are rotated differently per patient; the heart rows were measured with it), similarity LNCC "
        "(MIND-SSC for CT -> MR). BTCV scans are read with their header correction (`orientation`: LAS, the shared "
        "files' headers reverse the anterior-posterior axis); the CT -> MR rows were measured with it, the BTCV -> "
        "BTCV rows before it (both scans of a pair mirrored alike). "
        f"Measured {results['date']} on {results['machine'].get('cpu_count')} CPU cores, "
        f"{results['threads']} torch thread(s) per process, other jobs sharing the machine (times are indicative)."
    )
    return "\n".join(rows)


def add_methods(add: list[str], args, work: Path) -> None:
    """Score K = 1 methods on the queries of the stored records and merge them in (see ``--add``)."""
    bad = [m for m in add if METHODS.get(m, (0,))[0] != 1]
    if bad:
        raise SystemExit(f"--add takes K = 1 methods of {sorted(m for m, v in METHODS.items() if v[0] == 1)}, got {bad}")
    stored = json.loads((RESULTS_DIR / "registration.json").read_text())
    records = {(r["protocol"], r["query"]): r for r in stored["records"]}
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    subjects, runs = load(protocols)
    by_id = {s["subject"]: s for s in subjects}
    for proto in runs:
        queries = sorted(q for q in proto["query_subjects"] if (proto["name"], q) in records)
        todo = queries[args.skip:] if args.queries is None else queries[args.skip:args.skip + args.queries]
        for i, query in enumerate(todo):
            path = work / "add" / proto["name"] / f"{query}.json"
            if not path.is_file():
                write_json(path, run_query(proto, query, by_id, 1, 0, i, args.threads, only={"atlas", *add}))
            new = json.loads(path.read_text())
            rec = records[(proto["name"], query)]
            if new["atlases"][0] != rec["atlases"][0]:
                raise SystemExit(f"{query}: first atlas {new['atlases'][0]} != stored {rec['atlases'][0]}")
            for s, row in new["dice"].items():
                for m in add:
                    if m in row:
                        rec["dice"][s][m] = row[m]
                rec.setdefault("atlas_rescored", {})[s] = row.get("atlas")
            rec["seconds"].update({k: v for k, v in new["seconds"].items() if k.startswith(tuple(add))})
            print(f"{proto['name']} {query}: " + ", ".join(
                f"{s} atlas {rec['dice'][s]['atlas']:.3f} (again {row.get('atlas', float('nan')):.3f}) "
                + " ".join(f"{m} {row[m]:.3f}" for m in add if m in row) for s, row in new["dice"].items()),
                flush=True)
    stored["records"] = list(records.values())
    stored["summary"] = summarize(stored["records"])
    stored["methods"] = METHODS
    stored.setdefault("added", {}).update({m: time.strftime("%Y-%m-%d") for m in add})
    write_json(RESULTS_DIR / "registration.json", stored)
    md = table(stored)
    update_readme_table(MARKER, md)
    print(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--k", type=int, default=1, help="atlases per query (1, 3 or 5: K = 5 also gives K = 3)")
    parser.add_argument("--queries", type=int, default=None, help="first N queries of each protocol")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N queries (share work between processes)")
    parser.add_argument("--elastix", type=int, default=0, help="run elastix on the first N queries' first atlas")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(BENCH_DIR / "_work" / "registration"))
    parser.add_argument("--collect", action="store_true", help="only write results/registration.json and the table")
    parser.add_argument("--add", default="", help="K = 1 methods (e.g. atlas_st) to add to the records already in "
                        "results/registration.json: the first atlas is registered again, `atlas` re-scored as a check")
    args = parser.parse_args()
    work = Path(args.work)
    if args.add:
        add_methods([m.strip() for m in args.add.split(",") if m.strip()], args, work)
        return
    if not args.collect:
        if not os.environ.get("MONAI_DATA_DIRECTORY"):
            raise SystemExit("set MONAI_DATA_DIRECTORY")
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
        subjects, runs = load(protocols)
        by_id = {s["subject"]: s for s in subjects}
        for proto in runs:
            queries = sorted(proto["query_subjects"])
            todo = queries[args.skip:] if args.queries is None else queries[args.skip:args.skip + args.queries]
            for i, query in enumerate(todo):
                path = work / proto["name"] / f"{query}_k{args.k}.json"
                if path.is_file():
                    continue
                rec = run_query(proto, query, by_id, args.k, args.elastix, i + args.skip, args.threads)
                write_json(path, rec)
                main4 = {s: round(v.get("atlas", float("nan")), 3) for s, v in rec["dice"].items()}
                print(f"{proto['name']} fold {proto['fold']} {query} <- {rec['atlases']}: {main4} "
                      f"({rec['seconds']['query']:.0f} s)", flush=True)
    # one record per (protocol, query): the largest K run for it
    best: dict = {}
    for path in sorted(work.glob("*/*_k*.json")):
        rec = json.loads(path.read_text())
        key = (rec["protocol"], rec["query"])
        if key not in best or len(rec["atlases"]) > len(best[key]["atlases"]):
            best[key] = rec
    records = list(best.values())
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "threads": args.threads,
               "methods": METHODS, "summary": summarize(records), "records": records}
    write_json(RESULTS_DIR / "registration.json", results)
    md = table(results)
    update_readme_table(MARKER, md)
    print(md)


if __name__ == "__main__":
    main()
