"""Distributed meta-training throughput: episodes per second with 1 and 2 gloo processes on the CPU.

What is timed is the trainer the bundles' ``configs/multi_gpu_train.json`` runs: ``MetaTrainer(distributed=True)``
over :func:`~monai_metalearn.engines.distributed_episode_loader`, every rank training its share of each global
meta-batch and all-reducing the meta-gradients (:class:`~monai_metalearn.engines.MetaGradientSync`). Settings follow
the classification bundle's ``train.json``: ``ConvEncoder3D(1, (16, 32, 64, 64), norm="group", pooled_size=2)``,
5-way 1-shot 5-query episodes of 32^3 patches, each learner's bundle defaults (``learner_defaults``), Adam 1e-3, a
global meta-batch of ``--meta-batch`` tasks (split over the ranks). The episodes are cut from a fixed pool of random
tensors held in memory (20 per class, 10 classes): their content does not change the cost, and no data loading is
timed, only meta-training (episode assembly, inner loops, backward passes, the all-reduce, the optimizer step).

Each run starts ``world`` processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1, one torch thread each) that
run ``--warmup + --steps`` meta-updates; the clock runs from the end of the warm-up updates to the end of the last,
on rank 0 (the ranks meet at every all-reduce). Worlds 1 and 2 alternate in every repeat (1, 2, 2, 1, 1, 2, ...), so
machine noise falls on both; reported: median episodes per second over the repeats, and the scaling efficiency
``eps(2) / (2 * eps(1))`` taken per repeat (adjacent runs) then the median. The machine's own ceiling is measured in
the same run: :func:`_common.parallel_speedup` (two CPU-bound Python processes against one, ideal 2.0); an efficiency
near ``parallel_speedup / 2`` means the trainer scales as well as the cores allow.

Usage::

    .venv/bin/python benchmarks/bench_scaling.py                       # 4 learners, 3 repeats (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_scaling.py --learners protonet --repeats 1 --steps 2   # smoke run

Writes ``benchmarks/results/scaling.json`` and the table between ``<!-- scaling:start -->`` and
``<!-- scaling:end -->`` in ``benchmarks/README.md``. GPU rows read "not measured" unless CUDA is present (nccl runs
are not part of this script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, parallel_speedup, update_readme_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
TRAIN_JSON = ROOT / "bundles" / "fewshot_classification_3d" / "configs" / "train.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pool(patch: int, classes: int = 10, per_class: int = 20, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(1, patch, patch, patch, generator=g), "class": f"c{c}", "subject": f"s{i % 4}"}
            for c in range(classes) for i in range(per_class)]


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from ignite.engine import Events

    from monai_metalearn.data import ClassificationEpisodeDataset
    from monai_metalearn.engines import MetaTrainer, destroy_distributed, distributed_episode_loader, init_distributed
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    if world > 1:
        init_distributed("gloo")
    torch.manual_seed(0)
    encoder = ConvEncoder3D(1, tuple(cfg["features"]), norm="group", pooled_size=2)
    learner = create_learner(cfg["learner"], encoder, encoder.out_features, cfg["n_way"], **cfg["learner_args"])
    updates = cfg["warmup"] + cfg["steps"]
    episodes = ClassificationEpisodeDataset(_pool(cfg["patch"]), n_way=cfg["n_way"], k_shot=cfg["k_shot"],
                                            q_query=cfg["q_query"], num_episodes=updates * cfg["meta_batch"], seed=1)
    loader = distributed_episode_loader(episodes, meta_batch_size=cfg["meta_batch"])
    trainer = MetaTrainer("cpu", 1, loader, learner, torch.optim.Adam(learner.parameters(), 1e-3),
                          distributed=world > 1)
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    trainer.run()
    if world > 1:
        destroy_distributed()
    if rank == 0:
        timed = stamps[cfg["warmup"] - 1:]
        seconds = timed[-1] - timed[0]
        Path(out).write_text(json.dumps({"seconds": seconds, "updates": len(timed) - 1,
                                         "episodes_per_s": (len(timed) - 1) * cfg["meta_batch"] / seconds}))


def run_once(world: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        ctx = mp.spawn(_worker, args=(world, _free_port(), cfg, str(out)), nprocs=world, join=False)
        while not ctx.join(timeout=5):
            pass
        return json.loads(out.read_text())


def table(results: dict) -> str:
    m = results["machine"]
    lines = ["| learner | episodes / s, 1 process | episodes / s, 2 gloo processes | speed-up | efficiency | "
             "repeats | 1 GPU |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in results["learners"].items():
        lines.append(f"| {name} | {r['eps_1']:.2f} | {r['eps_2']:.2f} | {r['speedup']:.2f} | "
                     f"{100 * r['efficiency']:.0f} % | {len(r['runs_1'])} | not measured (no GPU lent) |")
    s = results["settings"]
    lines.append("")
    lines.append(
        f"Meta-training throughput of `MetaTrainer(distributed=True)` (what `multi_gpu_train.json` runs), global "
        f"meta-batch {s['meta_batch']} tasks split over the ranks, {s['n_way']}-way {s['k_shot']}-shot "
        f"{s['q_query']}-query episodes of {s['patch']}^3 random-tensor patches (content does not change the cost), "
        f"`ConvEncoder3D{tuple(s['features'])}` with the classification bundle's per-learner defaults; "
        f"{s['steps']} timed meta-updates after {s['warmup']} warm-up, one torch thread per process, gloo on "
        f"127.0.0.1; median over {s['repeats']} repeats with worlds 1 and 2 alternating. Speed-up = "
        f"eps(2) / eps(1), efficiency = speed-up / 2 (per repeat, then the median). The machine's own ceiling, "
        f"measured in the same run: two CPU-bound processes run {results['parallel_speedup']:.2f}x as fast as one "
        f"(ideal 2.00), so efficiency cannot exceed about {50 * results['parallel_speedup']:.0f} % here. "
        f"Measured {results['date']} on {m['cpus_usable']} CPU cores ({m['cpu_model']}), torch {m['torch']}, other "
        f"jobs sharing the machine. No GPU was lent: the GPU column and nccl are not measured.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learners", default="protonet,fomaml,maml,reptile")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed meta-updates per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=4, help="global meta-batch (tasks per update, all ranks)")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    if args.meta_batch % 2:
        raise SystemExit("--meta-batch must be even (it is split over 2 ranks)")
    defaults = json.loads(TRAIN_JSON.read_text())
    base = {"features": defaults["features"], "n_way": defaults["n_way"], "k_shot": defaults["k_shot"],
            "q_query": defaults["q_query"], "patch": args.patch, "meta_batch": args.meta_batch,
            "steps": args.steps, "warmup": args.warmup}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ceiling = parallel_speedup(2)
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "parallel_speedup": ceiling,
                     "settings": {**base, "repeats": args.repeats}, "learners": {}}
    for name in args.learners.split(","):
        cfg = {**base, "learner": name, "learner_args": defaults["learner_defaults"].get(name, {})}
        runs = {1: [], 2: []}
        for rep in range(args.repeats):
            for world in ((1, 2) if rep % 2 == 0 else (2, 1)):
                r = run_once(world, cfg)
                runs[world].append(r["episodes_per_s"])
                print(f"{name} world {world} repeat {rep}: {r['episodes_per_s']:.2f} episodes/s", flush=True)
        speedups = [b / a for a, b in zip(runs[1], runs[2])]
        results["learners"][name] = {"eps_1": median(runs[1]), "eps_2": median(runs[2]), "runs_1": runs[1],
                                     "runs_2": runs[2], "speedup": median(speedups),
                                     "efficiency": median(speedups) / 2, "learner_args": cfg["learner_args"]}
    write_json(RESULTS, results)
    md = table(results)
    print(md)
    if not args.no_readme:
        update_readme_table("scaling", md)


if __name__ == "__main__":
    main()
