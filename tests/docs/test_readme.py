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


def test_readme_atlas_example_runs_on_real_ct(data_dir):
    """The registration-based block: BTCV 01's liver carried onto BTCV 00 (a different subject) by ``atlas_em``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "atlas_em" in b)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, str(README), "exec"), namespace)
    dice = float(out.getvalue().strip().splitlines()[-1])
    assert namespace["mask"].shape == namespace["subjects"]["btcv_sabs_00"]["image"].shape
    # a liver from another subject's labels: far above the whole-body mask (about 0.14 on BTCV), below perfect
    assert 0.75 < dice < 0.99
