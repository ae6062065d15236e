"""``make demo``: meta-train few-shot learners on the real scans, evaluate them on held-out structures, print a table.

Runs the ``fewshot_classification_3d`` bundle (the same configs as ``python -m monai.bundle run``) once per method
with short settings, then its ``evaluate.json`` on the test classes: 5-way 1-shot and 5-shot episodes whose support
comes from one CT and whose query comes from the other (cross-subject). Training classes include brain structures
whose images are SYNTHESIZED from the real SynthSeg label maps; the test classes are real CT only.

Usage::

    python -m monai_metalearn.demo                                   # the default methods, a few minutes on 2 CPUs
    python -m monai_metalearn.demo --methods finetune,protonet,maml,fomaml --epochs 3 --test_episodes 300
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["bundle_dir", "run_method", "main"]

DEFAULT_METHODS = ("finetune", "protonet")


def bundle_dir(name: str = "fewshot_classification_3d") -> Path:
    """The bundle folder of a source checkout (``<repo>/bundles/<name>``)."""
    root = Path(__file__).resolve().parents[1] / "bundles" / name
    if not (root / "configs" / "train.json").is_file():
        raise SystemExit(f"monai-metalearn: error: bundle {name!r} not found at {root} (run from a source checkout)")
    return root


def _workflow(configs: list[str], **override: Any):
    from monai.bundle import ConfigWorkflow

    root = bundle_dir()
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / c) for c in configs],
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=None,
        bundle_root=str(root),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def run_method(
    method: str, output_dir: Path, epochs: int, episodes_per_epoch: int, test_episodes: int, progress: bool
) -> dict[str, Any]:
    """Trains and evaluates one method through the bundle; returns its ``metrics.json`` plus the train time."""
    out = output_dir / method
    common = dict(
        learner_name=method,
        output_dir=str(out),
        ckpt_path=str(out / "model.pt"),
        cache_dir=str(output_dir / "cache"),
        progress=progress,
    )
    t0 = time.perf_counter()
    _workflow(["train.json"], epochs=epochs, episodes_per_epoch=episodes_per_epoch, **common)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _workflow(["train.json", "evaluate.json"], test_episodes=test_episodes, **common)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["train_seconds"] = round(train_s, 1)
    metrics["evaluate_seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def _cell(summary: dict[str, Any]) -> str:
    acc = summary["accuracy"]
    return f"{100 * acc['mean']:5.1f} ± {100 * acc['ci95']:4.1f}"


def main(
    methods: str | tuple[str, ...] = DEFAULT_METHODS,
    epochs: int = 2,
    episodes_per_epoch: int = 15,
    test_episodes: int = 100,
    output_dir: str = "outputs/demo",
    progress: bool = False,
) -> dict[str, Any]:
    """Meta-trains each method briefly, evaluates 5-way 1/5-shot on the held-out CT structures, prints a table.

    Args:
        methods: comma-separated learner names (``finetune, protonet, maml, fomaml, anil, metasgd, reptile``).
        epochs, episodes_per_epoch: meta-training length per method (the bundle's defaults are 5 x 40).
        test_episodes: evaluation episodes per shot setting.
        output_dir: checkpoints, metrics, TensorBoard logs and the patch cache.
        progress: progress bars.
    """
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not os.environ.get("MONAI_DATA_DIRECTORY"):
        raise SystemExit("monai-metalearn: error: set MONAI_DATA_DIRECTORY to the data folder (make demo does)")
    out = Path(output_dir).resolve()
    train_cfg = json.loads((bundle_dir() / "configs" / "train.json").read_text())
    print(
        f"monai-metalearn demo: data {os.environ['MONAI_DATA_DIRECTORY']}\n"
        f"  meta-train {len(train_cfg['train_classes'])} classes (real CT, real T1 MRI, and brain structures with "
        f"SYNTHETIC images from the 20 real SynthSeg label maps)\n"
        f"  meta-val {len(train_cfg['val_classes'])} classes; meta-test {len(train_cfg['test_classes'])} real CT "
        f"structures: {', '.join(train_cfg['test_classes'])}\n"
        f"  test episodes: support from one CT, query from the other (cross-subject; 2 subjects behind the test "
        f"classes)\n  methods: {', '.join(methods)}; {epochs} x {episodes_per_epoch} meta-iterations each\n",
        flush=True,
    )
    results: dict[str, Any] = {}
    for method in methods:
        print(f"[{method}] meta-training and evaluating ...", flush=True)
        results[method] = run_method(method, out, epochs, episodes_per_epoch, test_episodes, progress)
        r = results[method]
        print(f"[{method}] 1-shot {_cell(r['by_shot']['1'])}  5-shot {_cell(r['by_shot']['5'])}  "
              f"(train {r['train_seconds']:.0f} s)", flush=True)
    header = f"| {'method':10} | 5-way 1-shot acc. % (95% CI) | 5-way 5-shot acc. % (95% CI) | train s |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for method, r in results.items():
        lines.append(
            f"| {method:10} | {_cell(r['by_shot']['1']):>28} | {_cell(r['by_shot']['5']):>28} | "
            f"{r['train_seconds']:7.0f} |"
        )
    table = "\n".join(lines)
    print(f"\nHeld-out CT structures, {test_episodes} episodes per setting (chance 20%):\n{table}\n", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    import fire

    logging.getLogger("ignite").setLevel(logging.WARNING)
    def cli(**kwargs: Any) -> None:
        main(**kwargs)

    cli.__doc__ = main.__doc__
    fire.Fire(cli)
