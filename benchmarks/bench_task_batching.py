"""Batched tasks: one meta-batch step with ``task_batching="vmap"`` (the tasks' inner loops as one ``torch.func.vmap``)
against ``task_batching="loop"`` (one task after the other), for each learner that has the option.

A step is ``learner.meta_batch_step(episodes, optimizer)`` on a meta-batch of ``--meta-batch`` (4) episodes, 5-way
1-shot, 5 queries per class (5 support and 25 query patches of ``--patch``^3 = 16^3 per episode), ``inner_steps``
``--inner-steps`` (1), inner lr 0.1; MAML-family learners step Adam (lr 1e-3), Reptile interpolates (``epsilon``
0.1, SGD inner steps). The episodes are fixed standard-normal tensors (seed 0): their content does not change the
cost of a step, only their shapes do.

Networks: ``conv4`` = ``FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64)), 64, n_way=5)`` (GroupNorm, the
package's default) and ``conv4bn`` = the same with ``norm="batch"`` in the learners' "transductive" BatchNorm mode.
On ``conv4bn`` second-order MAML and Meta-SGD do not use vmap (``torch.func.vmap`` gets second-order gradients
through batch-statistics normalisation wrong, see ``monai_metalearn.learners.task_batching``): they are not timed.

Before timing, each learner's two paths are checked against each other from identical weights: the meta-gradient
(MAML family, zero-lr SGD) or the Reptile update, max abs difference over the largest entry, and whether the vmap
path really ran (no fallback). Timing: the loop and vmap learners of a setting are run round-robin (the order rotates
every round), ``--warmup`` untimed rounds then ``--repeats`` timed rounds, ``gc.collect()`` outside the timer;
reported: median, interquartile range, every run, and the median over rounds of the per-round ratio vmap / loop.
Memory (``--no-memory`` skips it): one fresh subprocess per learner and mode (this script with ``--memory-worker``,
``MALLOC_MMAP_THRESHOLD_=65536``), peak resident memory of one step above the resident memory before it, after a
warm-up step (the method of ``bench_maml_step.py``).

``default chosen`` is what ``task_batching="auto"`` picks for the learner (``AUTO_TASK_BATCHING``), set from these
measurements: on the CPU vmap is slower for every learner, so ``"auto"`` is ``"loop"`` throughout.

Usage::

    .venv/bin/python benchmarks/bench_task_batching.py            # conv4 + conv4bn, 7 rounds (~4 min, 1 thread)
    .venv/bin/python benchmarks/bench_task_batching.py --quick    # smoke run: conv4, 2 rounds, saves nothing

Writes ``benchmarks/results/task_batching.json`` and the table between ``<!-- task_batching:start -->`` and
``<!-- task_batching:end -->`` in ``benchmarks/README.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as in the other benchmarks

import argparse
import copy
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    median,
    print_memory_json,
    quartiles,
    run_memory_worker,
    step_memory,
    time_round_robin,
    torch_device,
    update_readme_table,
    worker_or_from_json,
    write_json,
)

N_WAY, K_SHOT, N_QUERY = 5, 1, 5
INNER_LR, OUTER_LR, EPSILON = 0.1, 1e-3, 0.1
SEED = 0
NETWORKS = {
    "conv4": "FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64)), 64, n_way=5), GroupNorm",
    "conv4bn": 'FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64), norm="batch"), 64, n_way=5), BatchNorm '
    "(transductive)",
}
LEARNERS = ("maml", "fomaml", "anil", "metasgd", "reptile")
MODES = ("loop", "vmap")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: conv4, 2 rounds, results not saved")
    p.add_argument("--networks", nargs="+", default=None, choices=sorted(NETWORKS), help="default: conv4 conv4bn")
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    p.add_argument("--meta-batch", type=int, default=4, help="episodes per meta-batch (default 4)")
    p.add_argument("--patch", type=int, default=16, help="patch side (default 16)")
    p.add_argument("--inner-steps", type=int, default=1, help="inner steps (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the check (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/task_batching.json)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--from-json", type=Path, default=None, help="only regenerate the README table from this JSON")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # "network/learner/mode"
    args = p.parse_args(argv)
    args.networks = args.networks or (["conv4"] if args.quick else ["conv4", "conv4bn"])
    args.repeats = args.repeats or (2 if args.quick else 7)
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR / "task_batching.json"
    return args


# ---------------------------------------------------------------------------------------------------- setting


def make_episodes(meta_batch: int, patch: int) -> list[tuple]:
    import torch

    g = torch.Generator().manual_seed(SEED)
    labels = torch.arange(N_WAY)
    return [
        (
            torch.randn(N_WAY * K_SHOT, 1, patch, patch, patch, generator=g),
            labels.repeat_interleave(K_SHOT),
            torch.randn(N_WAY * N_QUERY, 1, patch, patch, patch, generator=g),
            labels.repeat_interleave(N_QUERY),
        )
        for _ in range(meta_batch)
    ]


def build_model(network: str):
    import torch

    from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier

    torch.manual_seed(SEED)  # identical initial weights for every learner and mode
    norm = "batch" if network == "conv4bn" else "group"
    return FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64), norm=norm), 64, n_way=N_WAY)


def build_learner(name: str, model, mode: str, inner_steps: int):
    from monai_metalearn.learners import ANIL, FOMAML, MAML, MetaSGD, Reptile

    if name == "reptile":
        return Reptile(model, inner_lr=INNER_LR, inner_steps=inner_steps, epsilon=EPSILON, task_batching=mode)
    cls = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD}[name]
    return cls(model, inner_lr=INNER_LR, inner_steps=inner_steps, n_way=N_WAY, task_batching=mode)


def vmap_runs(name: str, network: str) -> bool:
    """Whether the learner keeps the vmap path on the network (second order + BatchNorm falls back)."""
    return not (network == "conv4bn" and name in ("maml", "metasgd"))


class Runner:
    """One learner in one mode with its optimizer; ``step()`` is the timed meta-batch step."""

    def __init__(self, name: str, network: str, mode: str, inner_steps: int, episodes: list, device) -> None:
        import torch

        self.learner = build_learner(name, build_model(network), mode, inner_steps).to(device)
        self.optimizer = None if name == "reptile" else torch.optim.Adam(self.learner.parameters(), lr=OUTER_LR)
        self.episodes = episodes

    def step(self) -> dict[str, float]:
        return self.learner.meta_batch_step(self.episodes, self.optimizer)


def check(name: str, network: str, inner_steps: int, episodes: list, device) -> dict[str, Any]:
    """Loop vs vmap from identical weights: meta-gradient (zero-lr SGD) or Reptile update; did vmap run."""
    import torch

    out, metrics = {}, {}
    for mode in MODES:
        learner = build_learner(name, build_model(network), mode, inner_steps).to(device)
        before = [p.detach().clone() for p in learner.parameters()]
        optimizer = None if name == "reptile" else torch.optim.SGD(learner.parameters(), lr=0.0)
        metrics[mode] = learner.meta_batch_step(episodes, optimizer)
        if name == "reptile":
            out[mode] = [p.detach() - b for p, b in zip(learner.parameters(), before)]
        else:
            out[mode] = [p.grad.detach().clone() for p in learner.parameters() if p.grad is not None]
        if mode == "vmap":
            ran = bool(learner._task_batching.verified)
    diff = max(float((a - b).abs().max()) for a, b in zip(out["loop"], out["vmap"]))
    scale = max(float(a.abs().max()) for a in out["loop"])
    return {
        "compared": "Reptile update (weights after - before)" if name == "reptile" else "meta-gradient",
        "max_abs_diff": diff,
        "max_abs_value": scale,
        "max_abs_diff_over_max_abs_value": diff / scale if scale else 0.0,
        "loss_loop": metrics["loop"]["loss"],
        "loss_vmap": metrics["vmap"]["loss"],
        "vmap_ran": ran,
    }


# ---------------------------------------------------------------------------------------------------- timing


def summarise(values: list[float]) -> dict[str, Any]:
    q1, q3 = quartiles(values)
    return {
        "median_s": round(median(values), 4),
        "q1_s": round(q1, 4),
        "q3_s": round(q3, 4),
        "runs_s": [round(v, 4) for v in values],
    }


# ---------------------------------------------------------------------------------------------------- memory


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess: peak extra resident memory of one step of ``args.memory_worker`` = ``network/learner/mode``."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device(args.device)
    network, name, mode = args.memory_worker.split("/")
    episodes = [tuple(t.to(device) for t in e) for e in make_episodes(args.meta_batch, args.patch)]
    runner = Runner(name, network, mode, args.inner_steps, episodes, device)
    runner.step()  # warm-up: optimizer state, lazy initialisation
    mem = step_memory(runner.step, device)
    res: dict[str, Any] = {}
    if mem.peak_kib is not None and mem.rss_before_kib is not None:
        res["peak_step_mib"] = round((mem.peak_kib - mem.rss_before_kib) / 1024, 1)
    if mem.cuda_peak_step_mib is not None:
        res["cuda_peak_step_mib"] = mem.cuda_peak_step_mib
    print_memory_json(res)


def measure_memory(key: str, args: argparse.Namespace, device) -> dict[str, Any]:
    return run_memory_worker(__file__, key, [
        "--device", str(device), "--meta-batch", str(args.meta_batch), "--patch", str(args.patch),
        "--inner-steps", str(args.inner_steps),
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- report


def _fmt_s(c: dict | None) -> str:
    return "-" if not c else f"{c['median_s']:.3f} ({c['q1_s']:.3f}-{c['q3_s']:.3f})"


def _fmt_mem(c: dict | None) -> str:
    m = (c or {}).get("memory") or {}
    return "-" if "peak_step_mib" not in m else f"{m['peak_step_mib']:.0f}"


def markdown_table(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    gpu = m.get("cuda")
    head = (
        "| learner | network | loop s | vmap s | ratio vmap / loop | peak MiB (loop / vmap) | rel. diff | "
        "default chosen | GPU loop / vmap |\n"
        "|---|---|---:|---:|---:|---:|---:|---|---|"
    )
    rows = []
    for s in result["settings"].values():
        c, chk = s["modes"], s.get("check") or {}
        if not s["timed"]:
            rows.append(
                f"| {s['learner']} | {s['network']} | - | - | not timed: falls back to the loop (second order "
                f"through BatchNorm) | - | - | {s['default_chosen']} | not measured |"
            )
            continue
        ratio = s["ratio_vmap_over_loop"]
        rows.append(
            f"| {s['learner']} | {s['network']} | {_fmt_s(c.get('loop'))} | {_fmt_s(c.get('vmap'))} | "
            f"{ratio['median_paired_ratio']:.2f} | {_fmt_mem(c.get('loop'))} / {_fmt_mem(c.get('vmap'))} | "
            f"{chk.get('max_abs_diff_over_max_abs_value', float('nan')):.0e} | {s['default_chosen']} | "
            + ("measured on " + gpu if gpu else "not measured")
            + " |"
        )
    ep = cfg["episode"]
    device = gpu or f"{m.get('cpus_usable')} usable CPUs ({(m.get('cpu_model') or '?').split()[0]})"
    notes = [
        f"- one step = `meta_batch_step` of {cfg['meta_batch']} episodes, {N_WAY}-way {K_SHOT}-shot {N_QUERY} queries "
        f"per class, {ep['patch'][0]}^3 patches ({ep['source'].split(':')[0]} tensors: content does not change the "
        f"cost), {cfg['inner_steps']} inner step(s), inner lr {INNER_LR}; MAML family: Adam lr {OUTER_LR}; Reptile: "
        f"interpolation, epsilon {EPSILON}, SGD inner steps",
        "- s: median (interquartile range) of the timed rounds; ratio: median over rounds of vmap / loop (run back "
        f"to back, order rotating), {cfg['repeats']} rounds after {cfg['warmup']} warm-up round(s)",
        "- peak MiB: peak resident memory of one step above the resident memory before it (fresh process per "
        "learner and mode, after a warm-up step); rel. diff: max abs difference between the loop's and vmap's "
        "meta-gradient (Reptile: update) over its largest entry, from identical weights",
        "- default chosen: `task_batching=\"auto\"` (`AUTO_TASK_BATCHING`); vmap is slower on the CPU for every "
        "learner, so it is the loop",
        f"- networks: conv4 = {NETWORKS['conv4']}; conv4bn = {NETWORKS['conv4bn']}",
        f"- {device}, torch {m.get('torch')} ({m.get('torch_threads')} thread), MONAI {m.get('monai')}, "
        f"{result['date']}",
    ]
    return head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes)


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    early = worker_or_from_json(args, memory_worker, "task_batching", markdown_table)
    if early is not None:
        return early
    warnings.filterwarnings("ignore")
    import torch

    from monai_metalearn.learners import ANIL, FOMAML, MAML, MetaSGD, Reptile

    auto = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD, "reptile": Reptile}
    device = torch_device(args.device)
    t_start = time.perf_counter()
    episodes = [tuple(t.to(device) for t in e) for e in make_episodes(args.meta_batch, args.patch)]

    settings: dict[str, Any] = {}
    for network in args.networks:
        for name in args.learners:
            key = f"{network}/{name}"
            setting: dict[str, Any] = {
                "learner": name,
                "network": network,
                "default_chosen": auto[name].AUTO_TASK_BATCHING,
                "timed": vmap_runs(name, network),
                "modes": {},
            }
            settings[key] = setting
            print(f"{key}: check", flush=True)
            setting["check"] = chk = check(name, network, args.inner_steps, episodes, device)
            print(f"    max abs diff {chk['max_abs_diff']:.2e} (max {chk['max_abs_value']:.2e}), vmap ran: "
                  f"{chk['vmap_ran']}", flush=True)
            if not setting["timed"]:
                continue
            runners = {mode: Runner(name, network, mode, args.inner_steps, episodes, device) for mode in MODES}
            runs = time_round_robin(runners, args.repeats, args.warmup, device, digits=3)
            setting["vmap_ran_timed"] = bool(runners["vmap"].learner._task_batching.verified)
            del runners
            gc.collect()
            paired = [v / lo for v, lo in zip(runs["vmap"], runs["loop"])]
            q1, q3 = quartiles(paired)
            setting["modes"] = {mode: summarise(runs[mode]) for mode in MODES}
            setting["ratio_vmap_over_loop"] = {
                "median_paired_ratio": round(median(paired), 3),
                "paired_ratio_q1_q3": [round(q1, 3), round(q3, 3)],
                "ratio_of_medians": round(median(runs["vmap"]) / median(runs["loop"]), 3),
            }
            setting["measured"] = time.strftime("%Y-%m-%d %H:%M")
    if not args.no_memory:
        for key, setting in settings.items():
            if setting["timed"]:
                for mode in MODES:
                    print(f"memory: {key}/{mode}", flush=True)
                    setting["modes"][mode]["memory"] = measure_memory(f"{key}/{mode}", args, device)

    out = {
        "benchmark": "task_batching",
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            "quick": args.quick,
            "episode": {
                "source": f"synthetic: fixed standard-normal tensors, seed {SEED} (content does not change the cost)",
                "n_way": N_WAY,
                "k_shot": K_SHOT,
                "n_query_per_class": N_QUERY,
                "patch": [args.patch] * 3,
            },
            "meta_batch": args.meta_batch,
            "inner_steps": args.inner_steps,
            "inner_lr": INNER_LR,
            "outer": f"MAML family: Adam lr {OUTER_LR}; Reptile: interpolate epsilon {EPSILON}, SGD inner steps",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "order": "round-robin, rotating start every round",
            "device": str(device),
            "dtype": "float32",
            "networks": {n: NETWORKS[n] for n in args.networks},
        },
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "settings": settings,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    table = markdown_table(out)
    print(table)
    if args.out is not None:
        print("wrote", write_json(args.out, out))
        if not args.no_readme:
            print("updated", update_readme_table("task_batching", table))
    return out


if __name__ == "__main__":
    main()
