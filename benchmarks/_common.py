"""Helpers shared by the benchmark scripts: JSON results, machine description, README tables, medians."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR / "README.md"
RESULTS_DIR = BENCH_DIR / "results"

__all__ = [
    "BENCH_DIR",
    "README",
    "RESULTS_DIR",
    "median",
    "machine_info",
    "parallel_speedup",
    "write_json",
    "update_readme_table",
    "sync_device",
    "quartiles",
    "time_round_robin",
    "loadavg",
    "proc_status_kib",
    "reset_peak_rss",
    "StepMemory",
    "step_memory",
    "print_memory_json",
    "run_memory_worker",
    "worker_or_from_json",
    "torch_device",
    "finish",
]


def median(values: Iterable[float]) -> float:
    """Median of ``values`` (raises ``ValueError`` when empty)."""
    values = list(values)
    if not values:
        raise ValueError("median of an empty list")
    return float(statistics.median(values))


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _busy_loop(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def parallel_speedup(processes: int = 2, n: int = 10_000_000, repeats: int = 3) -> float:
    """How much faster ``processes`` CPU-bound processes finish ``processes`` equal tasks than one process does
    them in turn (ideal: ``processes``; median of ``repeats``). Lower on shared or hyper-threaded CPUs, and an upper
    bound of what ``num_workers=processes`` can gain. Takes a few seconds."""
    import multiprocessing as mp

    ratios = []
    with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(processes) as pool:
        pool.map(_busy_loop, [1000] * processes)  # workers started
        for _ in range(repeats):
            one = _busy_loop(n)
            t0 = time.perf_counter()
            pool.map(_busy_loop, [n] * processes)
            ratios.append(processes * one / (time.perf_counter() - t0))
    return round(median(ratios), 2)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPUs, memory, library versions, torch threads, GPU if any."""
    import monai
    import numpy
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": _memory_gib(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> Path:
    """Write ``obj`` as indented JSON (``compact``: one line, for results with per-episode records) with parent
    folders created; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, separators=(",", ":"), default=str) if compact else json.dumps(obj, indent=2, default=str)
    path.write_text(text + "\n")
    return path


def update_readme_table(marker: str, markdown: str, readme: str | os.PathLike = README) -> Path:
    """Replace the text between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in ``readme``.

    Raises:
        ValueError: the README lacks the two markers (add them where the table belongs).
    """
    readme = Path(readme)
    text = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {start} ... {end} markers.")
    new = pattern.sub(lambda _: f"{start}\n{markdown.strip()}\n{end}", text, count=1)
    readme.write_text(new)
    return readme


def log_seconds(log: str | os.PathLike) -> float:
    """Wall time of a finished run from the first and last timestamps of its log (MONAI / ignite log lines)."""
    import datetime as dt

    stamps = [dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in Path(log).read_text().splitlines()
              if len(line) > 23 and line[:2] == "20" and line[4] == "-"]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else 0.0


def run_bundle(bundle: Path, configs: list[str], out: Path, cache: Path, threads: int, *args: str) -> float:
    """``python -m monai.bundle run`` of ``bundle`` with ``configs``, writing to ``out`` (log: ``<last config>.log``)
    with ``threads`` torch threads; returns the wall time. Raises ``RuntimeError`` naming the log on failure."""
    import subprocess
    import sys
    import time

    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--output_dir", str(out),
           "--ckpt_path", str(out / "model.pt"), "--cache_dir", str(cache), "--progress", "False", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log_file = out / f"{configs[-1].split('.')[0]}.log"
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=bundle, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed, see {log_file}")
    return time.perf_counter() - t0


def trained(out: Path) -> bool:
    """Whether ``out`` holds a finished ``train.json`` run (its final checkpoint and a completed log)."""
    log = out / "train.log"
    return (out / "model.pt").is_file() and log.is_file() and "Train completed" in log.read_text()


def dice_cell(d: dict | None, show_n: bool = True, min_n_for_ci: int = 0) -> str:
    """A summary ``{"mean", "ci95", "n_episodes" | "n"}`` as ``"mean ± ci (n)"`` in %; no CI when it is missing or
    the count is below ``min_n_for_ci``; ``"n/a"`` for ``None``."""
    if d is None:
        return "n/a"
    ci, n = d.get("ci95"), d.get("n_episodes", d.get("n"))
    cell = f"{100 * d['mean']:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None and n >= min_n_for_ci else "")
    return f"{cell} ({n})" if show_n else cell


# ---------------------------------------------------------------------------------------------------- timing


def sync_device(device) -> None:
    """``torch.cuda.synchronize()`` when ``device`` is a CUDA device (nothing otherwise)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method); both the value itself for a single value."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def time_round_robin(
    contenders: Mapping[str, Any], repeats: int, warmup: int, device, digits: int = 2
) -> dict[str, list[float]]:
    """Time ``contenders[name].step()`` round-robin (rotating start every round), ``warmup`` rounds untimed.

    ``gc.collect()`` and a device sync come before each step, outside the timer. Prints one line a round with the
    seconds of each contender (``digits`` decimals). Returns the timed seconds per contender.
    """
    names = list(contenders)
    runs: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, float] = {}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # round-robin, rotating start
            gc.collect()
            sync_device(device)
            t0 = time.perf_counter()
            contenders[name].step()
            sync_device(device)
            last[name] = time.perf_counter() - t0
            if r >= warmup:
                runs[name].append(last[name])
        done = "warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        print(f"    {done}: " + ", ".join(f"{n} {last[n]:.{digits}f}s" for n in names), flush=True)
    return runs


def loadavg() -> float | None:
    """The 1-minute load average (``None`` where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------- memory

#: the prefix of the line a memory worker prints its JSON result on
MEMORY_JSON = "MEMORY_JSON "


def proc_status_kib(field: str) -> int | None:
    """A KiB field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), ``None`` where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident memory (``VmHWM``) via ``/proc/self/clear_refs``; whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StepMemory(NamedTuple):
    """What :func:`step_memory` measured."""

    rss_before_kib: int | None  #: VmRSS before the step
    peak_kib: int | None  #: VmHWM after the step (``None`` when the peak could not be reset)
    cuda_peak_step_mib: float | None  #: CUDA only: max_memory_allocated - memory_allocated before the step


def step_memory(step: Callable[[], Any], device) -> StepMemory:
    """Run ``step()`` once after ``gc.collect()``, a device sync and a reset of the peak RSS (and CUDA peak)."""
    import torch

    gc.collect()
    sync_device(device)
    reset = reset_peak_rss()
    rss0 = proc_status_kib("VmRSS")
    cuda0 = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)
    step()
    sync_device(device)
    peak = proc_status_kib("VmHWM") if reset else None
    cuda_peak = None
    if cuda0 is not None:
        cuda_peak = round((torch.cuda.max_memory_allocated(device) - cuda0) / 2**20, 1)
    return StepMemory(rss0, peak, cuda_peak)


def print_memory_json(result: Any) -> None:
    """The memory worker's answer to :func:`run_memory_worker` (one line on stdout)."""
    print(MEMORY_JSON + json.dumps(result), flush=True)


def run_memory_worker(script: str | os.PathLike, name: str, args: list[str]) -> Any:
    """Run ``script --memory-worker name *args`` in a fresh process (``MALLOC_MMAP_THRESHOLD_=65536``) and return
    what it printed with :func:`print_memory_json`.

    Raises:
        RuntimeError: with the tail of the worker's output when it printed no result.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(script).resolve()), "--memory-worker", name, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_JSON):
            return json.loads(line[len(MEMORY_JSON) :])
    raise RuntimeError(f"memory worker {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------- main


def worker_or_from_json(
    args: Any, worker: Callable[[Any], None], marker: str, table: Callable[[dict], str]
) -> dict | None:
    """The start of a benchmark's ``main``: run the memory worker (``--memory-worker``, returns ``{}``), or rewrite
    the README table ``marker`` from ``--from-json`` (returns that JSON); ``None`` when neither was asked for."""
    if args.memory_worker:
        worker(args)
        return {}
    if args.from_json is not None:
        out = json.loads(args.from_json.read_text())
        print("updated", update_readme_table(marker, table(out)))
        return out
    return None


def torch_device(requested: str | None):
    """``torch.set_num_threads($OMP_NUM_THREADS)`` and the device: ``requested``, else CUDA when available, else CPU."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def finish(out: dict, args: Any, marker: str, table: Callable[[dict], str]) -> None:
    """The end of a benchmark's ``main``: print the total time, write ``--out``, print the table and, unless
    ``--quick`` or ``--no-readme``, update the README table ``marker``."""
    print(f"total {out['total_s']} s")
    if args.out is not None:
        print("wrote", write_json(args.out, out))
    print(table(out))
    if not args.quick and not args.no_readme:
        print("updated", update_readme_table(marker, table(out)))
