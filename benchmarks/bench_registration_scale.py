"""Registration at scale: the K atlases of one query registered in one problem against one registration per atlas,
and queries spread over 2 gloo ranks.

For each BTCV query and K in ``--ks``, side by side in the same run (the order of the paths rotates between
repeats), through the product's own learner (a fresh ``AtlasSegmenter`` per run, nothing cached):

* ``loop``: ``AtlasSegmenter(atlas_batch_size=1)``: one ``register`` per atlas;
* ``batched``: ``AtlasSegmenter(atlas_batch_size=8)``: one ``register_many`` problem (the query side prepared once,
  one optimisation for the K atlases; on the CPU per-item kernels, the default there);
* ``vectorised`` (K in ``--vectorized-ks``): ``register_many(..., vectorize=True)``, the batched kernels that are the
  default on CUDA, run on the CPU.

Reported: seconds per query (median of ``--repeats``), the speed-up over ``loop`` (ratio of the medians), the peak
RSS growth of the run (``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``, minus the RSS at the
start), the Dice of every atlas's carried labels on the query's liver, spleen and kidneys (mean over the K atlases)
and of their majority vote, and whether the result equals ``loop``'s bit for bit (else the mean Dice between the two
paths' carried labels). The atlases of a query are the first K of ``--atlases`` (never the query).

Then ``--gloo-queries`` queries, one atlas each (``--gloo-atlas``), registered by 1 process and by 2 gloo processes
(``shard_queries`` / ``gather_results``), queries per minute; the machine's own 2-process ceiling
(``_common.parallel_speedup``) beside it, since other jobs share its cores.

No GPU is lent to this project: the GPU rows say "not measured".

Usage::

    python benchmarks/bench_registration_scale.py                      # ~6 min on one core
    python benchmarks/bench_registration_scale.py --queries 7,9 --repeats 3 --gloo-queries 0
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, median, parallel_speedup, update_readme_table, write_json  # noqa: E402

MARKER = "registration_scale"
ORGANS = {"liver": 6, "spleen": 1, "kidney_right": 2, "kidney_left": 3}


# ------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _start_peak() -> int:
    """Frees what can be freed, resets the peak RSS to the current RSS; returns the current RSS (KiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


# ------------------------------------------------------------------------------------------------ data
def _read(subjects: list[int], pixdim: float) -> dict[int, dict]:
    from monai_metalearn.data import scan_reader

    root = Path(os.environ["MONAI_DATA_DIRECTORY"]) / "btcv_sabs"
    read = scan_reader(["image", "label"], (pixdim,) * 3)
    return {s: read({"image": str(root / f"image_{s}.nii.gz"), "label": str(root / f"label_{s}.nii.gz")})
            for s in subjects}


def _settings(args) -> dict:
    return {"spacing": args.spacing, "levels": (2, 1), "iterations": (args.deformable_iterations,
                                                                     args.deformable_iterations // 2),
            "affine_levels": (2, 1), "affine_iterations": (args.affine_iterations, args.affine_iterations // 2),
            "initial_refine_iterations": args.refine_iterations}


# ------------------------------------------------------------------------------------------------ one run
def _run(path: str, atlases: list, query, settings: dict) -> tuple[float, float, list]:
    """Seconds, peak RSS growth (MiB) and the registration results of one path."""
    from monai_metalearn.learners import AtlasSegmenter
    from monai_metalearn.registration import register_many

    start = _start_peak()
    t0 = time.perf_counter()
    if path == "vectorised":
        results = register_many(atlases, query, vectorize=True, **settings)
    else:
        learner = AtlasSegmenter(registration=settings, atlas_batch_size=1 if path == "loop" else 8, cache_size=0)
        results = learner.register_atlases(atlases, query)
    seconds = time.perf_counter() - t0
    return seconds, (_status_kib("VmHWM") - start) / 1024, results


def _dice(results: list, atlases: list[dict], query: dict) -> tuple[dict, dict]:
    """Per organ: the mean over atlases of the carried label's Dice, and the Dice of their majority vote."""
    from monai_metalearn.registration import dice_per_label

    warped = [r.warp_label(a["label"]).as_tensor() for r, a in zip(results, atlases)]
    truth = query["label"].as_tensor()
    per_atlas, fused = {}, {}
    for organ, lab in ORGANS.items():
        per_atlas[organ] = sum(dice_per_label(w, truth, [lab])[lab] for w in warped) / len(warped)
        vote = (torch.stack([(w == lab).float() for w in warped]).mean(0) > 0.5).long()
        fused[organ] = dice_per_label(vote, (truth == lab).long(), [1])[1]
    return per_atlas, fused


def _agreement(a: list, b: list, atlases: list[dict]) -> dict:
    from monai_metalearn.registration import dice_per_label

    same = all(torch.equal(x.affine, y.affine) and (x.field is None) == (y.field is None)
               and (x.field is None or torch.equal(x.field, y.field)) for x, y in zip(a, b))
    labels = list(ORGANS.values())
    dices = [v for x, y, at in zip(a, b, atlases)
             for v in dice_per_label(x.warp_label(at["label"]), y.warp_label(at["label"]), labels).values()]
    return {"bitwise_equal": bool(same), "dice_between_paths": sum(dices) / len(dices)}


def bench_batching(args, settings: dict) -> list[dict]:
    queries = [int(q) for q in args.queries.split(",") if q.strip()]
    pool = [int(a) for a in args.atlases.split(",") if a.strip()]
    ks = [int(k) for k in args.ks.split(",")]
    vec_ks = {int(k) for k in args.vectorized_ks.split(",") if k.strip()}
    scans = _read(sorted(set(queries) | set(pool)), args.pixdim)
    # warm-up, not timed: lazy imports and first-call allocations would count against whichever path runs first
    _run("loop", [scans[pool[0]]["image"]], scans[queries[0]]["image"], settings)
    rows = []
    for q in queries:
        atlases_all = [a for a in pool if a != q][:max(ks)]
        for k in ks:
            names = atlases_all[:k]
            atl = [scans[a] for a in names]
            paths = ["loop", "batched"] + (["vectorised"] if k in vec_ks else [])
            times: dict[str, list[float]] = {p: [] for p in paths}
            rss: dict[str, list[float]] = {p: [] for p in paths}
            first: dict[str, list] = {}
            for rep in range(args.repeats):
                order = paths[rep % len(paths):] + paths[:rep % len(paths)]
                for p in order:
                    sec, mib, res = _run(p, [a["image"] for a in atl], scans[q]["image"], settings)
                    times[p].append(sec)
                    rss[p].append(mib)
                    first.setdefault(p, res)
                    print(f"query {q} K={k} {p:10s} repeat {rep}: {sec:.1f} s, peak +{mib:.0f} MiB", flush=True)
            base = median(times["loop"])
            for p in paths:
                per_atlas, fused = _dice(first[p], atl, scans[q])
                rows.append({"device": "cpu", "query": q, "atlases": names, "k": k, "path": p,
                             "seconds": [round(t, 2) for t in times[p]], "median_s": round(median(times[p]), 2),
                             "speedup_vs_loop": round(base / median(times[p]), 3),
                             "peak_rss_growth_mib": round(max(rss[p]), 1), "dice": per_atlas, "fused_dice": fused,
                             "vs_loop": _agreement(first["loop"], first[p], atl) if p != "loop" else None})
    return rows


# ------------------------------------------------------------------------------------------------ ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register_share(queries: list[int], atlas: int, pixdim: float, settings: dict, rank: int | None = None,
                    world: int | None = None) -> tuple[float, list]:
    """Registers ``atlas`` to this rank's share of ``queries``; returns (seconds after loading, gathered Dice)."""
    from monai_metalearn.engines import gather_results, shard_queries
    from monai_metalearn.learners import AtlasSegmenter

    scans = _read(sorted({atlas, *queries}), pixdim)
    share = shard_queries(queries, rank, world)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    t0 = time.perf_counter()
    learner = AtlasSegmenter(registration=settings, cache_size=0)
    done = []
    for i, q in share:
        result = learner.register_pair(scans[atlas]["image"], scans[q]["image"])
        done.append((i, result.dice(scans[atlas]["label"], scans[q]["label"], [ORGANS["liver"]])[6]))
    gathered = gather_results(done, len(queries))
    return time.perf_counter() - t0, gathered


def _rank(rank: int, world: int, port: int, queries: list[int], atlas: int, pixdim: float, settings: dict,
          out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from monai_metalearn.engines import destroy_distributed, init_distributed

    init_distributed("gloo")
    seconds, gathered = _register_share(queries, atlas, pixdim, settings)
    if rank == 0:
        torch.save({"seconds": seconds, "dice": gathered}, out)
    destroy_distributed()


def bench_ranks(args, settings: dict) -> dict | None:
    import tempfile

    import torch.multiprocessing as mp

    queries = [int(q) for q in args.gloo_queries.split(",") if q.strip() and q.strip() != "0"]
    if not queries:
        return None
    single, dice1 = _register_share(queries, args.gloo_atlas, args.pixdim, settings, 0, 1)
    out = Path(tempfile.mkdtemp()) / "rank0.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, _free_port(), queries, args.gloo_atlas, args.pixdim, settings, str(out)), nprocs=2)
    two = torch.load(out, weights_only=False)
    return {"queries": queries, "atlas": args.gloo_atlas, "one_process_s": round(single, 2),
            "two_ranks_s": round(two["seconds"], 2), "queries_per_min_1": round(60 * len(queries) / single, 2),
            "queries_per_min_2": round(60 * len(queries) / two["seconds"], 2),
            "speedup": round(single / two["seconds"], 3), "same_dice": dice1 == two["dice"],
            "liver_dice": [round(d, 4) for d in dice1], "machine_two_process_ceiling": parallel_speedup(2)}


# ------------------------------------------------------------------------------------------------ table
def table(res: dict) -> str:
    s = res["settings"]
    rows = ["| device | query | K | path | s / query (median) | speed-up vs loop | peak RSS growth MiB | "
            "Dice liver / spleen / kidney R / kidney L (per atlas) | majority vote | vs loop |",
            "|---|---:|---:|---|---:|---:|---:|---|---|---|"]
    for r in res["rows"]:
        d, f = r["dice"], r["fused_dice"]
        cells = " / ".join(f"{100 * d[o]:.1f}" for o in ORGANS)
        fused = " / ".join(f"{100 * f[o]:.1f}" for o in ORGANS) if r["k"] > 1 else "-"
        vs = "-" if r["vs_loop"] is None else ("identical (bitwise)" if r["vs_loop"]["bitwise_equal"] else
                                               f"Dice {100 * r['vs_loop']['dice_between_paths']:.1f} between paths")
        rows.append(f"| CPU | {r['query']} | {r['k']} | {r['path']} | {r['median_s']:.1f} "
                    f"({', '.join(f'{t:.1f}' for t in r['seconds'])}) | {r['speedup_vs_loop']:.2f} | "
                    f"{r['peak_rss_growth_mib']:.0f} | {cells} | {fused} | {vs} |")
    for k in sorted({r["k"] for r in res["rows"]}):
        rows.append(f"| GPU | - | {k} | loop / batched (vectorised) | not measured (no GPU lent) | | | | | |")
    g = res.get("ranks")
    lines = ["\n".join(rows), ""]
    if g:
        lines += ["| queries over ranks (K = 1) | queries | 1 process: queries / min | 2 gloo ranks: queries / min | "
                  "speed-up | machine's 2-process ceiling | same results |", "|---|---:|---:|---:|---:|---:|---|",
                  f"| CPU | {len(g['queries'])} | {g['queries_per_min_1']:.1f} | {g['queries_per_min_2']:.1f} | "
                  f"{g['speedup']:.2f} | {g['machine_two_process_ceiling']:.2f} | "
                  f"{'yes' if g['same_dice'] else 'no'} |",
                  "| GPU | | not measured (no GPU lent) | | | | |", ""]
    lines.append(
        f"BTCV queries {sorted({r['query'] for r in res['rows']})}, atlases the first K of {res['atlas_pool']} "
        f"(read at {res['pixdim']:g} mm); registration settings (coarse, so the run takes minutes): finest level "
        f"{s['spacing']:g} mm, deformable levels {s['levels']} x spacing with {s['iterations']} Adam iterations, "
        f"affine levels {s['affine_levels']} with {s['affine_iterations']}, multi-start "
        f"{s['initial_refine_iterations']} iterations, the other fields `RegistrationConfig`'s defaults (LNCC); at "
        "these settings the kidneys are mostly missed (accuracy at the default settings: the registration table "
        "above): the point here is that both paths give the same numbers. `loop`: `AtlasSegmenter(atlas_batch_size"
        "=1)`, one `register` per atlas; `batched`: `atlas_batch_size=8`, one `register_many` problem (CPU default: "
        "per-item kernels, the query side prepared once); `vectorised`: `register_many(vectorize=True)`, the batched "
        "kernels of the CUDA default, on the CPU. Dice % of each atlas's carried labels (mean over the K atlases) and "
        "of their majority vote; *vs loop*: the same transforms bit for bit, or the Dice between the two paths' "
        f"carried labels. Medians of {res['repeats']} repeats, paths interleaved; measured {res['date']} on "
        f"{res['machine'].get('cpu_count')} CPU cores, {res['threads']} torch thread, other jobs sharing the machine "
        "(times are indicative, ratios are side by side).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", default="7", help="BTCV query subjects, comma-separated")
    parser.add_argument("--atlases", default="0,1,2,3,4,5", help="atlas pool: the first K that are not the query")
    parser.add_argument("--ks", default="1,3,5")
    parser.add_argument("--vectorized-ks", default="5", help="K values that also run vectorize=True ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixdim", type=float, default=4.0, help="scans read at this spacing (mm)")
    parser.add_argument("--spacing", type=float, default=6.0, help="finest registration level (mm)")
    parser.add_argument("--affine-iterations", type=int, default=20, help="coarse affine level (the fine one: half)")
    parser.add_argument("--deformable-iterations", type=int, default=16, help="coarse deformable level (fine: half)")
    parser.add_argument("--refine-iterations", type=int, default=5, help="multi-start iterations per candidate")
    parser.add_argument("--gloo-queries", default="7,9,11,13", help="queries of the rank comparison ('0': skip)")
    parser.add_argument("--gloo-atlas", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--collect", action="store_true", help="only rewrite the README table from the JSON")
    args = parser.parse_args()
    if args.collect:
        import json

        md = table(json.loads((RESULTS_DIR / f"{MARKER}.json").read_text()))
        update_readme_table(MARKER, md)
        print(md)
        return
    if not os.environ.get("MONAI_DATA_DIRECTORY"):
        raise SystemExit("set MONAI_DATA_DIRECTORY")
    torch.set_num_threads(args.threads)
    settings = _settings(args)
    t0 = time.perf_counter()
    rows = bench_batching(args, settings)
    ranks = bench_ranks(args, settings)
    from monai_metalearn.registration import RegistrationConfig

    cfg = RegistrationConfig(**settings)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "threads": args.threads,
           "repeats": args.repeats, "pixdim": args.pixdim, "atlas_pool": [int(a) for a in args.atlases.split(",")],
           "settings": {"spacing": cfg.spacing, "levels": list(cfg.levels), "iterations": list(cfg.iterations),
                        "affine_levels": list(cfg.affine_levels), "affine_iterations": list(cfg.affine_iterations),
                        "initial_refine_iterations": cfg.initial_refine_iterations, "similarity": cfg.similarity},
           "rows": rows, "ranks": ranks, "gpu": "not measured (no GPU lent)",
           "wall_s": round(time.perf_counter() - t0, 1)}
    write_json(RESULTS_DIR / f"{MARKER}.json", res)
    md = table(res)
    if not args.no_readme:
        update_readme_table(MARKER, md)
    print(md)


if __name__ == "__main__":
    main()
