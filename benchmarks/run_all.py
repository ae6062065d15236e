"""Runs every benchmark in turn (``make benchmarks``): each writes ``results/<name>.json`` and its README table.

    python benchmarks/run_all.py            # all
    python benchmarks/run_all.py episodes   # only those whose name contains "episodes"
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = ["bench_episodes.py", "bench_maml_step.py", "bench_accuracy.py", "bench_segmentation.py"]


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    selected = [s for s in SCRIPTS if not argv or any(a in s for a in argv)]
    failed = []
    for script in selected:
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(here / script)]).returncode:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
