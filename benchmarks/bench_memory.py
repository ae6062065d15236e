"""Peak memory and time of one second-order MAML meta-step through the segmentation bundle's 3D UNet, with and
without activation checkpointing (and channels_last_3d on / off).

A meta-step is ``learner.outer_step`` on one episode: the inner loop (``inner_steps`` SGD steps, lr 0.1, on the
support patch), the query loss at the adapted weights (``segmentation_loss()``: Dice + cross-entropy), ``backward`` and
an Adam step (lr 1e-3). The learner is ``create_segmentation_learner("maml" | "fomaml", unet_backbone(...), 16,
activation_checkpointing=..., channels_last=...)`` on the network of ``bundles/fewshot_segmentation_3d/configs/
train.json`` (``unet_backbone(feature_channels=16, channels=(16, 32, 64, 128), strides=(2, 2, 2),
num_res_units=1, norm="instance")`` + the 1x1x1 head, 0.5 M parameters). Episode: 1-way 1-shot, one support patch
and ``--queries`` query patches of ``--patch``^3 voxels, a fixed random tensor with a random mask (seeded; the cost
does not depend on the content).

Checkpointing modes (``activation_checkpointing``, see :mod:`monai_metalearn.networks.checkpointing`):

- ``none``: the plain learner;
- ``blocks``: the UNet's down/up blocks (MONAI ``ResidualUnit`` / ``Convolution``) are checkpointed;
- ``steps``: each second-order inner step is checkpointed (``learner.checkpoint_inner_steps``);
- ``all``: both.

FOMAML (first order, ``none`` and ``blocks``) is the reference of what second order costs. ``channels_last_3d``
(``channels_last=True``) is measured for MAML ``none`` and ``all`` at the smallest inner-step count.

Before timing, each setting checks its meta-gradient against ``none``'s (same learner, same initial weights, same
episode): relative L2 difference over all parameters. That call is the warm-up; the contenders of one inner-step
count and learner are then timed round-robin (rotating order), ``--repeats`` rounds, ``gc.collect()`` before each step
outside the timer. Reported: median (interquartile range) and the median over rounds of the per-round ratio to
``none`` (run back to back, so machine noise cancels).

Memory (the method of ``bench_maml_step.py``): one fresh subprocess per contender (this script with
``--memory-worker``), started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensor buffers go back to the system
and the resident set follows live memory; it runs a warm-up step, and per inner-step count resets the peak RSS
(``/proc/self/clear_refs`` = 5), reads VmRSS and runs one measured step: peak step memory = VmHWM - VmRSS before. On
CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step is recorded as well. (After the first
inner-step count the process is warm; the next ones only initialise Adam's state, with zero gradients, before the
measured step.)

Usage::

    .venv/bin/python benchmarks/bench_memory.py                  # 32^3, 3 queries, inner steps 1 3 5 (~7 min)
    .venv/bin/python benchmarks/bench_memory.py --quick          # smoke run: inner steps 1, 1 repeat, saves nothing
    .venv/bin/python benchmarks/bench_memory.py --patch 48 --inner-steps 3 --repeats 3

Writes ``benchmarks/results/memory.json`` and the table between ``<!-- memory:start -->`` and ``<!-- memory:end -->``
in ``benchmarks/README.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as in the other benchmarks

import argparse
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
    finish,
    loadavg,
    machine_info,
    median,
    print_memory_json,
    quartiles,
    run_memory_worker,
    step_memory,
    time_round_robin,
    torch_device,
    worker_or_from_json,
)

INNER_LR, OUTER_LR, SEED = 0.1, 1e-3, 0
NETWORK = {"feature_channels": 16, "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1,
           "norm": "instance"}  # fmt: skip
MODES = ("none", "blocks", "steps", "all")
# contender key -> (learner, activation_checkpointing, channels_last)
CONTENDERS: dict[str, tuple[str, str, bool]] = {
    "maml/none": ("maml", "none", False),
    "maml/blocks": ("maml", "blocks", False),
    "maml/steps": ("maml", "steps", False),
    "maml/all": ("maml", "all", False),
    "fomaml/none": ("fomaml", "none", False),
    "fomaml/blocks": ("fomaml", "blocks", False),
    "maml/none+cl": ("maml", "none", True),
    "maml/all+cl": ("maml", "all", True),
}
GPU_NOTE = "not measured (no GPU lent)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: inner steps 1, 1 repeat, results not saved")
    p.add_argument("--inner-steps", type=int, nargs="+", default=None, help="default 1 3 5 (quick: 1)")
    p.add_argument("--patch", type=int, default=32, help="patch side in voxels (default 32)")
    p.add_argument("--queries", type=int, default=3, help="query patches (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per setting (default 3, quick 1)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/memory.json)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--from-json", type=Path, default=None, help="only regenerate the README table from this JSON")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.inner_steps = sorted(set(args.inner_steps or ([1] if args.quick else [1, 3, 5])))
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR / "memory.json"
    return args


def contender_steps(name: str, inner_steps: list[int]) -> list[int]:
    """The inner-step counts a contender is measured at (channels_last: the smallest only)."""
    return inner_steps[:1] if CONTENDERS[name][2] else inner_steps


# ---------------------------------------------------------------------------------------------------- setup
def make_episode(patch: int, queries: int, device):
    import torch

    g = torch.Generator().manual_seed(SEED)
    shape = (patch, patch, patch)
    sx = torch.randn(1, 1, *shape, generator=g)
    qx = torch.randn(queries, 1, *shape, generator=g)
    sy = (torch.rand(1, 1, *shape, generator=g) > 0.7).long()
    qy = (torch.rand(queries, 1, *shape, generator=g) > 0.7).long()
    return tuple(t.to(device) for t in (sx, sy, qx, qy))


class Contender:
    """One learner configuration: ``step()`` is the timed meta-step, ``meta_gradient()`` the untimed check."""

    def __init__(self, name: str, inner_steps: int, episode: tuple, device) -> None:
        import torch

        from monai_metalearn.learners import create_segmentation_learner
        from monai_metalearn.networks import unet_backbone

        learner_name, mode, channels_last = CONTENDERS[name]
        torch.manual_seed(SEED)  # identical initial weights for every contender
        backbone = unet_backbone(**NETWORK)
        self.learner = create_segmentation_learner(
            learner_name, backbone, NETWORK["feature_channels"], inner_lr=INNER_LR, inner_steps=inner_steps,
            activation_checkpointing=mode, channels_last=channels_last,
        ).to(device)  # fmt: skip
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=OUTER_LR)
        self.episode = episode

    def step(self) -> None:
        self.learner.outer_step(*self.episode, self.optimizer)

    def meta_gradient(self):
        import torch

        loss, _ = self.learner.meta_loss(*self.episode)
        params = [p for p in self.learner.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess: peak extra memory of one meta-step of ``args.memory_worker`` per inner-step count."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device(args.device)
    episode = make_episode(args.patch, args.queries, device)
    out = {}
    for i, k in enumerate(contender_steps(args.memory_worker, args.inner_steps)):
        c = Contender(args.memory_worker, k, episode, device)
        if i == 0:
            c.step()  # warm-up: optimizer state, kernels and allocator, lazy initialisation
        else:  # the process is warm: only the optimizer state (Adam with zero gradients leaves the weights as they are)
            for p in c.learner.parameters():
                p.grad = torch.zeros_like(p)
            c.optimizer.step()
            c.optimizer.zero_grad(set_to_none=True)
        mem = step_memory(c.step, device)
        rss0 = mem.rss_before_kib
        res: dict[str, Any]
        if mem.peak_kib is not None and rss0 is not None:
            res = {"peak_step_mib": round((mem.peak_kib - rss0) / 1024, 1),
                   "rss_before_step_mib": round(rss0 / 1024, 1), "method": "VmHWM after reset"}  # fmt: skip
        else:
            res = {"peak_step_mib": None, "method": "peak RSS not resettable on this system"}
        if mem.cuda_peak_step_mib is not None:
            res["cuda_peak_step_mib"] = mem.cuda_peak_step_mib
        out[str(k)] = res
        del c
        gc.collect()
    print_memory_json(out)


def measure_memory(name: str, args: argparse.Namespace, device) -> dict:
    return run_memory_worker(__file__, name, [
        "--device", str(device), "--patch", str(args.patch), "--queries", str(args.queries),
        "--inner-steps", *map(str, args.inner_steps),
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- report
def reference_of(name: str) -> str:
    """The contender a setting is compared with: the same learner without checkpointing or channels_last."""
    return f"{CONTENDERS[name][0]}/none"


def summarise(group: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, values in group.items():
        q1, q3 = quartiles(values)
        entry = {"median_s": round(median(values), 3), "q1_s": round(q1, 3), "q3_s": round(q3, 3),
                 "runs_s": [round(v, 3) for v in values]}  # fmt: skip
        ref = reference_of(name)
        if ref in group and ref != name:
            entry["time_over_none"] = round(median([a / b for a, b in zip(values, group[ref])]), 3)
        out[name] = entry
    return out


def add_memory_ratios(settings: dict[str, Any]) -> None:
    for key, s in settings.items():
        ref = settings.get(f"{reference_of(s['contender'])}/inner_steps={s['inner_steps']}")
        mem, ref_mem = s.get("memory", {}).get("peak_step_mib"), (ref or {}).get("memory", {}).get("peak_step_mib")
        if ref is not None and ref is not s and mem is not None and ref_mem:
            s["memory_over_none"] = round(mem / ref_mem, 3)


def markdown_table(result: dict[str, Any]) -> str:
    head = (
        "| learner | inner steps | checkpointing | channels_last | s/step | time x none | peak MiB | memory x none | "
        "meta-grad rel. diff vs none | GPU (CUDA peak MiB) |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|"
    )
    rows = []
    for s in result["settings"].values():
        mem = s.get("memory", {})
        gpu = f"{mem['cuda_peak_step_mib']:.0f}" if "cuda_peak_step_mib" in mem else GPU_NOTE
        rows.append(
            f"| {s['learner']} | {s['inner_steps']} | {s['checkpointing']} | {'on' if s['channels_last'] else 'off'} "
            f"| {s['median_s']:.2f} ({s['q1_s']:.2f}-{s['q3_s']:.2f}) | "
            + (f"{s['time_over_none']:.2f} | " if "time_over_none" in s else "1 | ")
            + (f"{mem['peak_step_mib']:.0f} | " if mem.get("peak_step_mib") is not None else "- | ")
            + (f"{s['memory_over_none']:.2f} | " if "memory_over_none" in s else ("1 | " if mem else "- | "))
            + (f"{s['grad_rel_diff_vs_none']:.1e} | " if "grad_rel_diff_vs_none" in s else "- | ")
            + f"{gpu} |"
        )
    cfg, m = result["config"], result["machine"]
    device = m.get("cuda") or f"{m.get('cpus_usable')} usable CPUs ({(m.get('cpu_model') or '?').split()[0]})"
    notes = [
        f"- one meta-step = `outer_step` on a 1-way 1-shot episode: 1 support + {cfg['queries']} query patches of "
        f"{cfg['patch']}^3 (fixed random tensor and mask), inner SGD lr {INNER_LR}, outer Adam lr {OUTER_LR}; "
        "network: the segmentation bundle's `unet_backbone` (channels 16-32-64-128, strides 2-2-2, 1 residual unit, "
        f"instance norm; {cfg['parameters']} parameters) + 1x1x1 head, `segmentation_loss()`",
        "- checkpointing: `activation_checkpointing` of `create_segmentation_learner` (`blocks`: UNet down/up blocks; "
        "`steps`: each second-order inner step recomputed in the outer backward; `all`: both); channels_last: "
        "`channels_last=True` (channels_last_3d weights and inputs)",
        f"- s/step: median (interquartile range) of {cfg['repeats']} timed rounds after an untimed gradient check; "
        "time x none: median over rounds of the ratio to the same learner without checkpointing / channels_last, "
        "run back to back",
        "- peak MiB: peak resident memory of one step above the resident memory before it, fresh process per "
        "contender, after a warm-up step (MALLOC_MMAP_THRESHOLD_=65536); meta-grad rel. diff: relative L2 difference "
        "of the meta-gradient from identical initial weights (channels_last: float32 rounding of other kernels; the "
        "same comparison in float64 gives 0, and float32 itself is about 4e-4 from float64 here)",
        f"- {device}, torch {m.get('torch')} ({m.get('torch_threads')} thread), MONAI {m.get('monai')}, "
        f"{result['date']}; GPU: {GPU_NOTE if not m.get('cuda') else 'see the CUDA column'}",
    ]
    return head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    early = worker_or_from_json(args, memory_worker, "memory", markdown_table)
    if early is not None:
        return early
    warnings.filterwarnings("ignore")
    import torch

    device = torch_device(args.device)
    t_start, load_before = time.perf_counter(), loadavg()
    episode = make_episode(args.patch, args.queries, device)
    settings: dict[str, Any] = {}
    n_params = None
    for k in args.inner_steps:
        for learner_name in ("maml", "fomaml"):
            names = [
                n
                for n in args.contenders
                if CONTENDERS[n][0] == learner_name and k in contender_steps(n, args.inner_steps)
            ]
            if not names:
                continue
            print(f"{learner_name} inner_steps={k}: gradient check + timing of {', '.join(names)}", flush=True)
            group = {n: Contender(n, k, episode, device) for n in names}
            n_params = n_params or sum(p.numel() for p in next(iter(group.values())).learner.parameters())
            grads = {n: c.meta_gradient() for n, c in group.items()}  # also the warm-up call
            runs = time_round_robin(group, args.repeats, 0, device)
            summary = summarise(runs)
            for n in names:
                _, mode, cl = CONTENDERS[n]
                entry = {"contender": n, "learner": learner_name, "inner_steps": k, "checkpointing": mode,
                         "channels_last": cl, **summary[n]}  # fmt: skip
                ref = reference_of(n)
                if ref in grads and ref != n:
                    entry["grad_rel_diff_vs_none"] = rel_diff(grads[n], grads[ref])
                settings[f"{n}/inner_steps={k}"] = entry
            del group, grads
            gc.collect()
    if not args.no_memory:
        for name in args.contenders:
            print(f"memory: {name}", flush=True)
            mem = measure_memory(name, args, device)
            for k, res in mem.items():
                settings[f"{name}/inner_steps={k}"]["memory"] = res
        add_memory_ratios(settings)
    order = {n: i for i, n in enumerate(CONTENDERS)}
    settings = dict(sorted(settings.items(), key=lambda kv: (kv[1]["learner"] != "maml", kv[1]["channels_last"],
                                                              kv[1]["inner_steps"], order[kv[1]["contender"]])))
    out = {
        "benchmark": "memory",
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            "quick": args.quick,
            "patch": args.patch,
            "queries": args.queries,
            "k_shot": 1,
            "n_way": 1,
            "inner_steps": args.inner_steps,
            "repeats": args.repeats,
            "network": {"builder": "monai_metalearn.networks.unet_backbone", **NETWORK, "head": "Conv3d(16, 2, 1)"},
            "parameters": n_params,
            "loss": "segmentation_loss() (Dice + cross-entropy)",
            "inner_optimizer": f"SGD lr {INNER_LR}",
            "outer_optimizer": f"Adam lr {OUTER_LR}",
            "episode": f"synthetic: fixed standard-normal patches, random 30% masks, seed {SEED} (cost does not "
            "depend on the content)",
            "device": str(device),
            "dtype": "float32",
            "timing": "per learner and inner-step count: untimed gradient check (warm-up), then round-robin rounds "
            "with rotating order; gc.collect() before each step outside the timer",
            "memory_method": "fresh subprocess per contender (MALLOC_MMAP_THRESHOLD_=65536), one warm-up step, then "
            "peak RSS reset (/proc/self/clear_refs 5); peak_step_mib = VmHWM after one step - VmRSS before it; "
            "cuda_peak_step_mib (CUDA only) = max_memory_allocated - memory_allocated before the step",
            "gpu": GPU_NOTE if device.type != "cuda" else str(device),
        },
        "machine": machine_info(),
        "settings": settings,
        "total_s": round(time.perf_counter() - t_start, 1),
        "loadavg_1min_before_after": [load_before, loadavg()],
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    finish(out, args, "memory", markdown_table)
    return out


if __name__ == "__main__":
    main()
