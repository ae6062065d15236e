"""The README's first example (sampling an episode from the real scans) runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_episode_example_runs(data_dir):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    example = blocks[0]
    assert len([line for line in example.splitlines() if line.strip()]) <= 12  # "a 10-line example"
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, str(README), "exec"), namespace)
    ep = namespace["ep"]
    assert ep["support_image"].shape == torch.Size([5, 1, 32, 32, 32])
    assert ep["query_image"].shape == torch.Size([35, 1, 32, 32, 32])
    assert sorted(ep["classes"]) == ["aorta", "liver", "pancreas", "spleen", "stomach"]
    assert not set(ep["support_subject"]) & set(ep["query_subject"])
    assert "set()" in out.getvalue()
