"""One MAML meta-step: this package's ``torch.func`` learners against the same step written with ``higher``.

A meta-step is one outer update from a meta-batch of one episode: ``zero_grad``, the inner loop (``inner_steps`` plain
SGD steps on the support set, ``inner_lr`` 0.1), the query loss at the adapted weights, ``backward`` and an Adam step
(lr 1e-3). Contenders, all on the same network (same initial weights) and the same episode:

- ``project_maml``: ``monai_metalearn.learners.MAML(...).outer_step`` (second order: ``create_graph=True``);
- ``higher_maml``: ``higher.innerloop_ctx(model, SGD(lr), copy_initial_weights=False)``, ``diffopt.step(loss)``
  per inner step, query loss ``backward`` (second order, the library's default ``track_higher_grads=True``);
- ``project_fomaml``: ``monai_metalearn.learners.FOMAML(...).outer_step`` (first order);
- ``higher_fo``: the same ``higher`` loop with ``track_higher_grads=False`` (the inner gradients are not
  differentiated and the fast weights are detached after each step); the query-loss gradient at the adapted weights
  is then copied onto the initial weights, which is the first-order MAML meta-gradient;
- ``plain``: the forward and backward passes a meta-step is made of, on the module itself (no functional call, no
  graph through the updates): ``inner_steps`` x (support forward + ``autograd.grad``), query forward + ``backward``,
  Adam step. ``ratio_to_plain`` = meta-step time / this.

Networks: ``conv4`` = ``FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64)), 64, n_way=5)`` (GroupNorm), and
``resnet10`` = ``FewShotClassifier(*monai_backbone("resnet10", in_channels=1), n_way=5)`` (MONAI's 3D ResNet-10
feature extractor with its BatchNorm; every contender runs it in this package's "transductive" BatchNorm mode: batch
statistics, running statistics untouched). The episode is 5-way 1-shot 15-query (5 support and 75 query patches of
32^3), cut once with ``patch_transforms`` from the real CT-1 structure crops (``build_structure_patches`` of
``totalseg_ct1`` at 2 mm: liver, spleen, both kidneys, stomach), or a fixed random tensor (``--synthetic``, or when
``MONAI_DATA_DIRECTORY`` lacks the scan). Its content does not change the cost.

Before timing, each setting checks that the contenders compute the same thing: the meta-gradient of ``project_maml``
against ``higher_maml`` and of ``project_fomaml`` against ``higher_fo`` (max abs difference over all parameters, from
identical initial weights); the second- vs first-order difference is recorded too, to show the check would notice
a missing second-order term.

Timing: the contenders of a setting are run round-robin (the order rotates every round): the gradient check is
each contender's first, untimed call (warm-up), then ``--warmup`` more untimed rounds (default 0) and ``--repeats``
timed rounds; ``gc.collect()`` before each step, outside the timer; CUDA steps are synchronised.
Reported: median, IQR and every run, and the median over rounds of the per-round ratio project / higher (the two
ran back to back in the same round, so machine noise cancels better than in the ratio of medians).

Memory: one fresh subprocess per contender (this script with ``--memory-worker``), started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns every tensor buffer to the system when it is freed and the
resident set follows live memory. For each setting it runs a warm-up step (optimizer state, lazy initialisation), then
resets the process's peak RSS (``/proc/self/clear_refs`` = 5), reads the current RSS and runs one measured step; the
peak step memory is ``VmHWM`` after the step minus the RSS before it: what the step needs on top of model, optimizer
state and episode. ``torch.profiler``'s ``profile_memory`` sums allocations instead of giving a peak, and
``tracemalloc`` does not see torch's buffers. Where the peak cannot be reset (not Linux) ``ru_maxrss`` is used and
the settings are measured in increasing cost order. On CUDA ``torch.cuda.max_memory_allocated`` minus the allocation
before the step is recorded as well.

learn2learn is not measured: it publishes no wheel (an sdist with Cython extensions that does not build against this
environment); the JSON records the ``pip download --only-binary :all:`` attempt.

Usage::

    .venv/bin/python benchmarks/bench_maml_step.py              # conv4, inner steps 1 and 5, 15 rounds (~12 min)
    .venv/bin/python benchmarks/bench_maml_step.py --quick      # smoke run: inner steps 1, 3 repeats, saves nothing
    .venv/bin/python benchmarks/bench_maml_step.py --backbones resnet10 --inner-steps 1 --repeats 3   # merged in

Writes ``benchmarks/results/maml_step.json`` (settings measured earlier and not re-measured are kept, see
``--fresh``) and the table between ``<!-- maml_step:start -->`` and ``<!-- maml_step:end -->`` in
``benchmarks/README.md``. ``pip install -e .[bench]`` installs ``higher``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as in the other benchmarks

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
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

N_WAY, K_SHOT, N_QUERY, PATCH = 5, 1, 15, 32
INNER_LR, OUTER_LR = 0.1, 1e-3
SEED = 0
STRUCTURES = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")
BACKBONES = {
    "conv4": "FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64)), 64, n_way=5), GroupNorm",
    "resnet10": 'FewShotClassifier(*monai_backbone("resnet10", in_channels=1), n_way=5), MONAI ResNet-10, BatchNorm '
    "(transductive)",
}
CONTENDERS = {
    "project_maml": "monai_metalearn MAML (2nd order)",
    "higher_maml": "higher innerloop_ctx (2nd order)",
    "project_fomaml": "monai_metalearn FOMAML",
    "higher_fo": "higher, track_higher_grads=False (1st order)",
    "plain": "plain forward+backward passes",
}
PAIRS = {"second order": ("project_maml", "higher_maml"), "first order": ("project_fomaml", "higher_fo")}
LEARN2LEARN = {
    "measured": False,
    "reason": (
        "no wheel: `pip download learn2learn --no-deps --no-binary :none: --only-binary :all:` finds no matching "
        "distribution (learn2learn ships only an sdist with Cython extensions, which does not build in this "
        "environment)"
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: inner steps 1, 3 repeats, results not saved")
    p.add_argument("--backbones", nargs="+", default=None, choices=sorted(BACKBONES), help="default: conv4")
    p.add_argument("--inner-steps", type=int, nargs="+", default=None, help="default: 1 5 (quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per setting (default 15, quick 3)")
    p.add_argument(
        "--warmup", type=int, default=0, help="untimed rounds before timing, after the gradient check (default 0)"
    )
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--synthetic", action="store_true", help="a fixed random episode instead of real CT patches")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/maml_step.json)")
    p.add_argument("--fresh", action="store_true", help="do not keep settings of an existing JSON")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--from-json", type=Path, default=None, help="only regenerate the README table from this JSON")
    # internal: the memory subprocess
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--episode-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backbones = args.backbones or ["conv4"]
    args.inner_steps = sorted(set(args.inner_steps or ([1] if args.quick else [1, 5])))
    args.repeats = args.repeats or (3 if args.quick else 15)
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR / "maml_step.json"
    return args


# ---------------------------------------------------------------------------------------------------- episode


def real_episode() -> tuple[tuple, dict[str, Any]]:
    """5-way 1-shot 15-query episode of 32^3 patches from the real CT-1 structure crops (seeded)."""
    import torch

    from monai_metalearn.data import build_structure_patches, load_datalist, patch_transforms

    t0 = time.perf_counter()
    crops = build_structure_patches(load_datalist("totalseg_ct1"), STRUCTURES, pixdim=(2, 2, 2), progress=False)
    by_class = {c["class"]: c for c in crops}
    transform = patch_transforms(spatial_size=(PATCH,) * 3).set_random_state(SEED)
    support, query = [], []
    for name in STRUCTURES:
        patches = [transform(dict(by_class[name]))["image"] for _ in range(K_SHOT + N_QUERY)]
        support += patches[:K_SHOT]
        query += patches[K_SHOT:]
    labels = torch.arange(N_WAY)

    def stack(patches: list) -> torch.Tensor:  # plain tensors, not MetaTensors
        return torch.stack([p.as_tensor() if hasattr(p, "as_tensor") else p for p in patches]).float().contiguous()

    episode = (
        stack(support),
        labels.repeat_interleave(K_SHOT),
        stack(query),
        labels.repeat_interleave(N_QUERY),
    )
    info = {
        "source": "real: totalseg_ct1 structure crops at 2 mm (build_structure_patches), one random patch_transforms "
        f"draw per example, seed {SEED}",
        "classes": list(STRUCTURES),
        "build_s": round(time.perf_counter() - t0, 1),
    }
    return episode, info


def synthetic_episode(reason: str) -> tuple[tuple, dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(SEED)
    labels = torch.arange(N_WAY)
    episode = (
        torch.randn(N_WAY * K_SHOT, 1, PATCH, PATCH, PATCH, generator=g),
        labels.repeat_interleave(K_SHOT),
        torch.randn(N_WAY * N_QUERY, 1, PATCH, PATCH, PATCH, generator=g),
        labels.repeat_interleave(N_QUERY),
    )
    return episode, {"source": f"synthetic: fixed standard-normal tensor, seed {SEED} ({reason})"}


def make_episode(synthetic: bool) -> tuple[tuple, dict[str, Any]]:
    if synthetic:
        return synthetic_episode("--synthetic")
    try:
        return real_episode()
    except Exception as e:  # no data directory, missing scan
        return synthetic_episode(f"real patches unavailable: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------------- contenders


def build_model(backbone: str, device):
    import torch

    from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier, monai_backbone

    torch.manual_seed(SEED)  # identical initial weights for every contender
    if backbone == "conv4":
        model = FewShotClassifier(ConvEncoder3D(1, (16, 32, 64, 64)), 64, n_way=N_WAY)
    elif backbone == "resnet10":
        encoder, dim = monai_backbone("resnet10", in_channels=1)
        model = FewShotClassifier(encoder, dim, n_way=N_WAY)
    else:
        raise ValueError(backbone)
    return model.to(device).train()


class Contender:
    """One way of doing the meta-step: ``meta_backward()`` leaves the meta-gradient in ``model``'s ``.grad``,
    ``step()`` is the whole timed meta-step."""

    def __init__(self, name: str, backbone: str, inner_steps: int, episode: tuple, device) -> None:
        import torch
        import torch.nn.functional as F

        from monai_metalearn.learners import FOMAML, MAML
        from monai_metalearn.networks import batch_norm_mode

        self.name = name
        self.model = model = build_model(backbone, device)
        sx, sy, qx, qy = episode
        k = inner_steps
        self.step: Callable[[], Any]
        if name in ("project_maml", "project_fomaml"):
            cls = MAML if name == "project_maml" else FOMAML
            learner = cls(model, inner_lr=INNER_LR, inner_steps=k, n_way=N_WAY)  # batch_norm="transductive"
            self.optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)

            def meta_backward() -> None:
                loss, _ = learner.meta_loss(sx, sy, qx, qy)
                loss.backward()

            self.meta_backward = meta_backward
            self.step = lambda: learner.outer_step(sx, sy, qx, qy, self.optimizer)  # the public training call
            return

        self.optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
        if name in ("higher_maml", "higher_fo"):
            import higher

            first_order = name == "higher_fo"
            inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)

            def meta_backward() -> None:
                with batch_norm_mode(model, "transductive"):  # same BatchNorm behaviour as the learners
                    with higher.innerloop_ctx(
                        model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
                    ) as (fmodel, diffopt):
                        for _ in range(k):
                            diffopt.step(F.cross_entropy(fmodel(sx), sy))
                        F.cross_entropy(fmodel(qx), qy).backward()
                        if first_order:  # the query gradient sits on the detached fast weights
                            for p, fast in zip(model.parameters(), fmodel.parameters()):
                                if fast.grad is not None:
                                    p.grad = fast.grad if p.grad is None else p.grad + fast.grad

        elif name == "plain":
            params = [p for p in model.parameters() if p.requires_grad]

            def meta_backward() -> None:
                with batch_norm_mode(model, "transductive"):
                    for _ in range(k):
                        torch.autograd.grad(F.cross_entropy(model(sx), sy), params)
                    F.cross_entropy(model(qx), qy).backward()

        else:
            raise ValueError(name)
        self.meta_backward = meta_backward

        def step() -> None:
            self.optimizer.zero_grad(set_to_none=True)
            meta_backward()
            self.optimizer.step()

        self.step = step

    def meta_gradient(self) -> list:
        """The meta-gradient from the current weights, without an optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_backward()
        grads = [p.grad.detach().clone() for p in self.model.parameters()]
        self.optimizer.zero_grad(set_to_none=True)
        return grads


def grad_diff(a: list, b: list) -> dict[str, float]:
    import torch

    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.abs().max()) for x in a)
    norm = float(torch.sqrt(sum((x - y).pow(2).sum() for x, y in zip(a, b))))
    ref_norm = float(torch.sqrt(sum(x.pow(2).sum() for x in a)))
    return {
        "max_abs_diff": diff,
        "max_abs_grad": scale,
        "max_abs_diff_over_max_abs_grad": diff / scale if scale else 0.0,
        "rel_l2_diff": norm / ref_norm if ref_norm else 0.0,
    }


def gradient_check(contenders: dict[str, Contender]) -> dict[str, Any]:
    """Meta-gradients from identical initial weights: project vs higher, second and first order.

    Also the first (untimed) call of every contender, ``plain`` included: kernels, allocator and autograd warmed up.
    """
    grads = {n: c.meta_gradient() for n, c in contenders.items()}
    out: dict[str, Any] = {}
    for order, (ours, theirs) in PAIRS.items():
        if ours in grads and theirs in grads:
            out[f"{ours}_vs_{theirs}"] = grad_diff(grads[ours], grads[theirs])
    if "project_maml" in grads and "project_fomaml" in grads:
        out["sensitivity_project_maml_vs_project_fomaml"] = grad_diff(grads["project_maml"], grads["project_fomaml"])
    return out


# ---------------------------------------------------------------------------------------------------- memory


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess: peak extra memory of one step of ``args.memory_worker`` for each backbone and inner-steps value."""
    import resource

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device(args.device)
    episode = tuple(t.to(device) for t in torch.load(args.episode_file, weights_only=True))
    out = {}
    for backbone in args.backbones:
        for k in args.inner_steps:
            c = Contender(args.memory_worker, backbone, k, episode, device)
            c.step()  # warm-up: optimizer state, lazy initialisation
            mem = step_memory(c.step, device)
            rss0 = mem.rss_before_kib
            if mem.peak_kib is not None and rss0 is not None:
                peak, method = mem.peak_kib, "VmHWM after reset"
            else:  # ru_maxrss: KiB on Linux, bytes on macOS
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak = peak // 1024 if sys.platform == "darwin" else peak
                method = "ru_maxrss (peak not resettable)"
                rss0 = rss0 if rss0 is not None else 0
            res = {
                "peak_step_mib": round((peak - rss0) / 1024, 1),
                "rss_before_step_mib": round(rss0 / 1024, 1),
                "method": method,
            }
            if mem.cuda_peak_step_mib is not None:
                res["cuda_peak_step_mib"] = mem.cuda_peak_step_mib
            out[f"{backbone}/{k}"] = res
            del c
            gc.collect()
    print_memory_json(out)


def measure_memory(name: str, backbones: list[str], inner_steps: list[int], episode_file: Path, device) -> dict:
    return run_memory_worker(__file__, name, [
        "--episode-file", str(episode_file), "--device", str(device), "--backbones", *backbones,
        "--inner-steps", *map(str, inner_steps),
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- report


def summarise(runs: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"contenders": {}, "ratios": {}}
    plain = median(runs["plain"]) if runs.get("plain") else None
    for name, values in runs.items():
        q1, q3 = quartiles(values)
        med = median(values)
        out["contenders"][name] = {
            "label": CONTENDERS[name],
            "median_s": round(med, 4),
            "q1_s": round(q1, 4),
            "q3_s": round(q3, 4),
            "iqr_s": round(q3 - q1, 4),
            "runs_s": [round(v, 4) for v in values],
            "ratio_to_plain": round(med / plain, 3) if plain else None,
        }
    for order, (ours, theirs) in PAIRS.items():
        if runs.get(ours) and runs.get(theirs):
            paired = [a / b for a, b in zip(runs[ours], runs[theirs])]
            q1, q3 = quartiles(paired)
            out["ratios"][f"time_{ours}_over_{theirs}"] = {
                "ratio_of_medians": round(median(runs[ours]) / median(runs[theirs]), 3),
                "median_paired_ratio": round(median(paired), 3),
                "paired_ratio_q1_q3": [round(q1, 3), round(q3, 3)],
            }
    return out


def add_memory_ratios(setting: dict[str, Any]) -> None:
    c = setting["contenders"]
    for order, (ours, theirs) in PAIRS.items():
        a, b = c.get(ours, {}).get("memory"), c.get(theirs, {}).get("memory")
        if a and b and b["peak_step_mib"] > 0:
            setting["ratios"][f"memory_{ours}_over_{theirs}"] = round(a["peak_step_mib"] / b["peak_step_mib"], 3)


def _fmt_s(c: dict | None) -> str:
    return "-" if not c else f"{c['median_s']:.2f} ({c['q1_s']:.2f}-{c['q3_s']:.2f})"


def _fmt_mem(c: dict | None) -> str:
    m = (c or {}).get("memory")
    return "-" if not m else f"{m['peak_step_mib']:.0f}"


def markdown_table(result: dict[str, Any]) -> str:
    head = (
        "| network | inner steps | order | monai_metalearn s/step | higher s/step | time ratio | plain s | "
        "x plain (ours / higher) | peak MiB (ours / higher) | memory ratio | max abs grad diff | runs |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for key, s in result["settings"].items():
        c = s["contenders"]
        plain = c.get("plain")
        for order, (ours, theirs) in PAIRS.items():
            if ours not in c or theirs not in c:
                continue
            ratio = s["ratios"].get(f"time_{ours}_over_{theirs}", {})
            mem_ratio = s["ratios"].get(f"memory_{ours}_over_{theirs}")
            check = s.get("gradient_check", {}).get(f"{ours}_vs_{theirs}", {})
            rows.append(
                f"| {s['backbone']} | {s['inner_steps']} | {order} | {_fmt_s(c[ours])} | {_fmt_s(c[theirs])} | "
                f"{ratio.get('median_paired_ratio', float('nan')):.3f} | "
                + (f"{plain['median_s']:.2f} | " if plain else "- | ")
                + (
                    f"{c[ours]['ratio_to_plain']:.2f} / {c[theirs]['ratio_to_plain']:.2f} | "
                    if plain
                    else "- | "
                )
                + f"{_fmt_mem(c[ours])} / {_fmt_mem(c[theirs])} | "
                + (f"{mem_ratio:.3f} | " if mem_ratio is not None else "- | ")
                + (f"{check['max_abs_diff']:.1e} | " if check else "- | ")
                + f"{s['repeats']} |"
            )
    cfg, m = result["config"], result["machine"]
    device = m.get("cuda") or f"{m.get('cpus_usable')} usable CPUs ({(m.get('cpu_model') or '?').split()[0]})"
    notes = [
        f"- one meta-step = meta-batch of 1 episode, 5-way 1-shot 15-query, {PATCH}^3 patches "
        f"({cfg['episode']['source'].split(':')[0]} episode), inner SGD lr {INNER_LR}, outer Adam lr {OUTER_LR}; "
        "s/step: median (interquartile range) of the timed rounds; time ratio: median over rounds of ours / higher "
        "(run back to back, order rotating)",
        "- plain: the same forward/backward passes on the module itself; x plain: meta-step median / plain median",
        "- peak MiB: peak resident memory of one step above the resident memory before it, fresh process per "
        "contender, after a warm-up step; grad diff: max abs difference of the meta-gradients from identical "
        "initial weights (second order: ours vs higher; first order: FOMAML vs higher track_higher_grads=False)",
        f"- networks: conv4 = {BACKBONES['conv4']}; resnet10 = {BACKBONES['resnet10']}",
        f"- {device}, torch {m.get('torch')} ({m.get('torch_threads')} thread), MONAI {m.get('monai')}, higher "
        f"{result['libraries']['higher']}; learn2learn not measured ({result['libraries']['learn2learn']['reason']})",
    ]
    return head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes)


# ---------------------------------------------------------------------------------------------------- main


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    early = worker_or_from_json(args, memory_worker, "maml_step", markdown_table)
    if early is not None:
        return early
    warnings.filterwarnings("ignore")
    import torch

    try:
        import higher  # noqa: F401
    except ImportError:
        sys.exit("bench_maml_step.py needs `higher`: pip install -e '.[bench]' (or pip install higher)")

    device = torch_device(args.device)
    t_start = time.perf_counter()
    load_before = loadavg()
    episode_cpu, episode_info = make_episode(args.synthetic)
    episode = tuple(t.to(device) for t in episode_cpu)
    print("episode:", episode_info["source"], flush=True)

    settings: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_maml_step_") as tmp:
        episode_file = Path(tmp) / "episode.pt"
        torch.save(episode_cpu, episode_file)
        for backbone in args.backbones:
            for k in args.inner_steps:
                key = f"{backbone}/inner_steps={k}"
                print(f"{key}: gradient check", flush=True)
                contenders = {n: Contender(n, backbone, k, episode, device) for n in args.contenders}
                check = gradient_check(contenders)
                for name, value in check.items():
                    print(f"    {name}: max abs diff {value['max_abs_diff']:.2e} (max |g| {value['max_abs_grad']:.2e})")
                print(f"{key}: timing {args.warmup} warm-up + {args.repeats} rounds", flush=True)
                runs = time_round_robin(contenders, args.repeats, args.warmup, device)
                n_params = sum(p.numel() for p in next(iter(contenders.values())).model.parameters())
                del contenders
                gc.collect()
                settings[key] = {
                    "backbone": backbone,
                    "network": BACKBONES[backbone],
                    "parameters": n_params,
                    "inner_steps": k,
                    "repeats": args.repeats,
                    "warmup_rounds": args.warmup,
                    "measured": time.strftime("%Y-%m-%d %H:%M"),
                    "gradient_check": check,
                    **summarise(runs),
                }
        if not args.no_memory:
            for name in args.contenders:
                print(f"memory: {name}", flush=True)
                mem = measure_memory(name, args.backbones, args.inner_steps, episode_file, device)
                for backbone in args.backbones:
                    for k in args.inner_steps:
                        settings[f"{backbone}/inner_steps={k}"]["contenders"][name]["memory"] = mem[f"{backbone}/{k}"]
            for s in settings.values():
                add_memory_ratios(s)

    out = {
        "benchmark": "maml_step",
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            "quick": args.quick,
            "episode": {
                **episode_info,
                "n_way": N_WAY,
                "k_shot": K_SHOT,
                "n_query_per_class": N_QUERY,
                "patch": [PATCH] * 3,
                "support_shape": list(episode_cpu[0].shape),
                "query_shape": list(episode_cpu[2].shape),
            },
            "meta_batch": 1,
            "inner_optimizer": f"SGD lr {INNER_LR} (no momentum)",
            "outer_optimizer": f"Adam lr {OUTER_LR}",
            "loss": "cross-entropy (mean)",
            "device": str(device),
            "dtype": "float32",
            "contenders": {n: CONTENDERS[n] for n in args.contenders},
            "timing": "round-robin over the contenders (rotating order), warm-up rounds untimed; gc.collect() before "
            "each step outside the timer; one step = zero_grad + inner loop + query loss + backward + Adam step",
            "memory_method": "fresh subprocess per contender (MALLOC_MMAP_THRESHOLD_=65536), one warm-up step, then "
            "peak RSS reset (/proc/self/clear_refs 5); peak_step_mib = VmHWM after one step - VmRSS before it; "
            "cuda_peak_step_mib (CUDA only) = max_memory_allocated - memory_allocated before the step",
        },
        "libraries": {"higher": _version("higher"), "learn2learn": LEARN2LEARN},
        "machine": machine_info(),
        "settings": settings,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    invocation = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "settings": list(settings),
        "total_s": out["total_s"],
        "loadavg_1min_before_after": [load_before, loadavg()],
    }
    out["invocations"] = [invocation]
    if args.out is not None and args.out.exists() and not args.fresh:
        old = json.loads(args.out.read_text())
        kept = {k: v for k, v in old.get("settings", {}).items() if k not in settings}
        if kept:
            print("kept from the previous JSON:", ", ".join(kept))
            out["invocations"] = [i for i in old.get("invocations", []) if set(i["settings"]) & set(kept)] + [
                invocation
            ]
            out["settings"] = {**kept, **settings}
            out["settings"] = dict(
                sorted(out["settings"].items(), key=lambda kv: (kv[1]["backbone"], kv[1]["inner_steps"]))
            )
    finish(out, args, "maml_step", markdown_table)
    return out


if __name__ == "__main__":
    main()
