"""The README's code blocks are its contract: every ``python`` block runs on the real scans and builds what it says,
and every shell command names files, configs and config keys that exist.

Each ``python`` block of ``README.md`` (and of ``bundles/*/docs/README.md``) is one test case, run in a fresh
namespace in a temporary working directory with ``MONAI_DATA_DIRECTORY`` set and its stdout captured, then checked by
the value check in ``CHECKS`` whose needle it contains. An HTML comment on the line right before a block's fence
tells this test how to run it:

- ``<!-- readme-test: after "<heading>" -->``: the block continues the example under that heading; those blocks run
  first, in the same namespace.
- ``<!-- readme-test: skip (<reason>) -->``: the block is not run here (e.g. it needs CUDA); the reason is required.

Shell blocks (``bash`` / ``sh`` / ``console``) are parsed, not run (they train for minutes): each ``cd`` folder,
``configs/*.json`` file, ``make`` target and ``python -m`` module must exist, and each ``--flag`` given to
``monai.bundle run`` must be a key of the merged configs it names.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import io
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted(ROOT.glob("bundles/*/docs/README.md"))]
SHELL_LANGS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")
# ``monai.bundle run``'s own arguments; every other ``--flag`` overrides a config key
EPISODE_KEYS = ("support_image", "support_label", "query_image", "query_label")
BUNDLE_RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    heading: str  # the nearest heading above it
    directive: str | None  # the ``readme-test:`` comment right before the fence

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-") or "top"
        return f"{self.path.relative_to(ROOT)}:{self.line}:{slug}"


def parse_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, with their heading and ``readme-test`` directive."""
    lines = path.read_text().splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = lines[start - 1].strip() if start else ""
        comment = DIRECTIVE.match(before)
        blocks.append(Block(path, start + 1, match.group(1), "\n".join(body) + "\n", heading,
                            comment.group(1) if comment else None))
        i += 1
    return blocks


def parse_directive(text: str | None) -> tuple[str, str] | None:
    """``("skip", reason)`` or ``("after", heading)`` from a ``readme-test:`` comment's text.

    Raises:
        ValueError: for a skip without a reason in parentheses, or any other text.
    """
    if text is None:
        return None
    skip = re.fullmatch(r"skip\s*\((.*)\)", text)
    if skip:
        if not skip.group(1).strip():
            raise ValueError(f"readme-test skip without a reason: {text!r}; write 'skip (<why it cannot run>)'")
        return "skip", skip.group(1).strip()
    after = re.fullmatch(r'after\s+"([^"]+)"', text)
    if after:
        return "after", after.group(1)
    raise ValueError(f"unknown readme-test directive {text!r}; use 'skip (<reason>)' or 'after \"<heading>\"'")


ALL_BLOCKS = [b for path in DOCS for b in parse_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]


def run_block(block: Block, namespace: dict) -> str:
    """Executes ``block`` in ``namespace``; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, f"{block.path}:{block.line}", "exec"), namespace)
    return out.getvalue()


# -- value checks, one per python block (selected by a needle in its code) -------------------------------------


def check_episode(block: Block, ns: dict, out: str, data_dir: Path) -> None:
    """An episode of 5 organs, 1 support and 7 query patches each, support and query from different subjects."""
    assert block == PYTHON_BLOCKS[0], "the episode example should be the README's first python block"
    assert len([line for line in block.code.splitlines() if line.strip()]) <= 12  # "a 10-line example"
    ep = ns["ep"]
    assert ep["support_image"].shape == torch.Size([5, 1, 32, 32, 32])
    assert ep["query_image"].shape == torch.Size([35, 1, 32, 32, 32])
    assert sorted(ep["classes"]) == ["aorta", "liver", "pancreas", "spleen", "stomach"]
    assert sorted(ep["support_label"].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(ep["query_label"].tolist()) == sorted([0, 1, 2, 3, 4] * 7)
    assert not set(ep["support_subject"]) & set(ep["query_subject"])
    assert set(ep["support_subject"]) | set(ep["query_subject"]) == {"totalseg_ct1", "totalseg_ct2"}
    assert "set()" in out


def check_meta_training(block: Block, ns: dict, out: str, data_dir: Path) -> None:
    """Two epochs of ProtoNet meta-training lower the episodic loss on the training episodes (against the same
    encoder re-initialised), the evaluator's accuracy is the mean over its episodes, and the new-class predictor
    gives one probability row per query."""
    learner, trainer, evaluator, train, test = (ns[k] for k in ("learner", "trainer", "evaluator", "train", "test"))
    device = ns["device"]
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * len(train) == 40

    fresh = copy.deepcopy(learner)
    torch.manual_seed(0)
    for module in fresh.modules():
        if module is not fresh and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def mean_loss(model) -> float:
        with torch.no_grad():
            return float(np.mean([model.meta_loss(*(e[k].to(device) for k in EPISODE_KEYS))[0].item()
                                  for e in (train[i] for i in range(5))]))

    trained, untrained = mean_loss(learner.eval()), mean_loss(fresh.eval())
    # well below uniform guessing (ln 3) and far below the untrained encoder (about 29 on these episodes)
    assert trained < 0.5 * math.log(3) and trained < 0.1 * untrained, (trained, untrained)

    metrics = evaluator.state.metrics
    assert metrics["n_episodes"] == len(test) == 10
    assert ast.literal_eval(out.strip().splitlines()[-1]) == metrics  # what the block prints
    with torch.no_grad():
        accs = []
        for e in (test[i] for i in range(len(test))):
            sx, sy, qx, qy = (e[k].to(device) for k in EPISODE_KEYS)
            accs.append(float((learner.adapt(sx, sy)(qx).argmax(1) == qy).float().mean()))
    assert metrics["accuracy"] == pytest.approx(np.mean(accs), abs=1e-6)
    assert 0.0 < metrics["accuracy_ci95"] < 0.5

    probabilities = ns["probabilities"].detach().cpu()
    assert probabilities.shape == (14, 2)
    assert torch.allclose(probabilities.sum(1), torch.ones(14), atol=1e-5)
    assert sorted(ns["ep"]["classes"]) == ["aorta", "pancreas"]


def check_atlas(block: Block, ns: dict, out: str, data_dir: Path) -> None:
    """BTCV 01's liver carried onto BTCV 00 (a different subject) by ``atlas_em``."""
    dice = float(out.strip().splitlines()[-1])
    assert ns["mask"].shape == ns["subjects"]["btcv_sabs_00"]["image"].shape
    # a liver from another subject's labels: far above the whole-body mask (about 0.14 on BTCV), below perfect
    assert 0.75 < dice < 0.99


def check_segment_task(block: Block, ns: dict, out: str, data_dir: Path) -> None:
    """One binary mask per query, on the query's own grid (shape and affine), with its volume listed."""
    import nibabel as nib

    result = ns["result"]
    assert result["k_shot"] == 1 and len(result["segmentations"]) == 1
    item = result["segmentations"][0]
    assert item["mask"] in out
    mask, query = nib.load(item["mask"]), nib.load(str(data_dir / "btcv_sabs" / "image_0.nii.gz"))
    assert mask.shape == query.shape == tuple(item["shape"])
    np.testing.assert_allclose(mask.affine, query.affine, atol=1e-4)
    values = np.asarray(mask.dataobj)
    assert set(np.unique(values).tolist()) <= {0, 1}
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000.0
    assert item["foreground_ml"] == pytest.approx(values.sum() * voxel_ml, abs=1e-2)
    assert json.loads(Path("out/segmentations.json").read_text()) == result


CHECKS: dict[str, Callable[[Block, dict, str, Path], None]] = {
    "build_structure_patches(": check_episode,
    "MetaTrainer(": check_meta_training,
    'create_segmentation_learner("atlas_em")': check_atlas,
    "seg.segment_task(": check_segment_task,
}


def check_for(block: Block) -> Callable[[Block, dict, str, Path], None]:
    found = [check for needle, check in CHECKS.items() if needle in block.code]
    assert len(found) == 1, (f"{block.id}: {len(found)} value checks match this python block; give it exactly one "
                             f"in CHECKS (needles: {list(CHECKS)})")
    return found[0]


def test_every_python_block_has_one_value_check_and_a_valid_directive():
    assert len([b for b in PYTHON_BLOCKS if b.path == README]) >= 4, "README lost its python examples"
    headings = {b.heading for b in PYTHON_BLOCKS}
    for block in PYTHON_BLOCKS:
        directive = parse_directive(block.directive)
        if directive and directive[0] == "after":
            assert directive[1] in headings and directive[1] != block.heading, (
                f"{block.id}: readme-test after {directive[1]!r} names no other heading with a python block")
        if not (directive and directive[0] == "skip"):
            check_for(block)
    used = {needle for needle in CHECKS if any(needle in b.code for b in PYTHON_BLOCKS)}
    assert used == set(CHECKS), f"value checks for blocks the README no longer has: {set(CHECKS) - used}"


def test_readme_test_comments_sit_before_a_block_and_skips_give_a_reason():
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "readme-test" in line:
                assert DIRECTIVE.match(line.strip()), f"{path}:{i + 1}: malformed readme-test comment {line!r}"
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                    f"{path}:{i + 1}: a readme-test comment must be the line right before a code fence")
                parse_directive(DIRECTIVE.match(line.strip()).group(1))
    assert parse_directive("skip (needs CUDA)") == ("skip", "needs CUDA")
    assert parse_directive('after "Sample an episode"') == ("after", "Sample an episode")
    for bad in ("skip", "skip ()", "skip (  )", "sikp (typo)"):
        with pytest.raises(ValueError, match="readme-test"):
            parse_directive(bad)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs_on_real_data(block, data_dir, tmp_path, monkeypatch):
    directive = parse_directive(block.directive)
    if directive and directive[0] == "skip":
        pytest.skip(f"{block.id} is marked in {block.path.name}: {directive[1]}")
    check = check_for(block)
    monkeypatch.setenv("MONAI_DATA_DIRECTORY", str(data_dir))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    if directive:  # ("after", heading): the blocks it continues run first
        earlier = [b for b in PYTHON_BLOCKS if b.heading == directive[1] and b.path == block.path]
        assert earlier, f"{block.id}: no python block under {directive[1]!r}"
        for b in earlier:
            run_block(b, namespace)
    out = run_block(block, namespace)
    check(block, namespace, out, data_dir)


# -- shell blocks -------------------------------------------------------------------------------------------------


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block as argument lists (comments, ``$`` prompts and continuations handled; ``&&``
    and ``;`` split commands)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)
        tokens = shlex.split(line, comments=True)
        command: list[str] = []
        for token in tokens:
            if token in ("&&", "||", ";", "|"):
                commands.append(command)
                command = []
            elif token.endswith(";"):
                command.append(token[:-1])
                commands.append(command)
                command = []
            else:
                command.append(token)
        commands.append(command)
    return [c for c in commands if c]


def bundle_run_flags(args: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` / ``--key`` arguments after ``monai.bundle run``."""
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        token = args[i]
        assert token.startswith("--"), f"unexpected positional argument {token!r} to monai.bundle run"
        key, eq, value = token[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            i += value is not None
        flags[key] = value
        i += 1
    return flags


def config_files(value: str) -> list[str]:
    """The files of a ``--config_file`` value: one path, a comma-separated list or a Python list literal."""
    value = value.strip()
    files = ast.literal_eval(value) if value.startswith("[") else value.split(",")
    return [str(f).strip() for f in files]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def check_shell_block(block: Block) -> int:
    """Checks every command of ``block``; returns the number of ``monai.bundle run`` commands checked."""
    from monai.bundle import ConfigParser

    cwd = ROOT if block.path == README else block.path.parents[1]  # a bundle's docs speak from the bundle folder
    n_runs = 0
    for command in shell_commands(block.code):
        where = f"{block.id}: {shlex.join(command)}"
        for token in command:
            for name in re.findall(r"configs/[\w.-]+\.json", token):
                assert (cwd / name).is_file(), f"{where}: {cwd / name} does not exist"
        if command[0] == "cd":
            cwd = (cwd / command[1]).resolve()
            assert cwd.is_dir(), f"{where}: no folder {cwd}"
        elif command[0] == "make":
            missing = {t for t in command[1:] if not t.startswith("-") and "=" not in t} - make_targets()
            assert not missing, f"{where}: the Makefile has no target(s) {sorted(missing)}"
        elif command[0].startswith("python") and command[1:2] == ["-m"]:
            module = command[2]
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
            if module == "monai.bundle" and command[3:4] == ["run"]:
                flags = bundle_run_flags(command[4:])
                assert flags.get("config_file"), f"{where}: no --config_file"
                files = [cwd / f for f in config_files(flags["config_file"])]
                for f in files:
                    assert f.is_file(), f"{where}: config {f} does not exist"
                for key in ("meta_file", "logging_file", "args_file"):
                    if flags.get(key):
                        assert (cwd / flags[key]).is_file(), f"{where}: --{key} {flags[key]} does not exist"
                parser = ConfigParser()
                parser.read_config([str(f) for f in files])
                unknown = [k for k in flags if k not in BUNDLE_RUN_ARGS and k not in parser]
                assert not unknown, f"{where}: --{unknown} is not a key of {[f.name for f in files]}"
                n_runs += 1
    return n_runs


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.id for b in SHELL_BLOCKS])
def test_shell_block_names_existing_files_configs_and_keys(block):
    check_shell_block(block)


def test_shell_blocks_cover_the_bundle_commands():
    """The parser sees the commands the READMEs give (a broken parser would check nothing)."""
    runs = {b.id: check_shell_block(b) for b in SHELL_BLOCKS}
    readme_runs = sum(n for b, n in zip(SHELL_BLOCKS, runs.values()) if b.path == README)
    expected = sum(b.code.count("monai.bundle run") for b in SHELL_BLOCKS if b.path == README)
    assert readme_runs == expected >= 10
    for path in DOCS[1:]:
        assert sum(n for b, n in zip(SHELL_BLOCKS, runs.values()) if b.path == path) >= 2, path
    with pytest.raises(AssertionError, match="is not a key"):
        check_shell_block(Block(README, 1, "bash", "cd bundles/fewshot_segmentation_3d\n"
                                "python -m monai.bundle run --config_file configs/train.json --no_such_key 1\n",
                                "bad", None))
    with pytest.raises(AssertionError, match="does not exist"):
        check_shell_block(Block(README, 1, "bash", "cd bundles/fewshot_segmentation_3d\npython -m monai.bundle run "
                                "--config_file \"['configs/train.json','configs/x.json']\"\n", "bad", None))


def test_configs_named_in_prose_exist():
    """``configs/*.json`` named in a README's text exist (in its bundle; for the top README, in some bundle)."""
    bundles = sorted(ROOT.glob("bundles/*/configs"))
    for path in DOCS:
        prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
        names = set(re.findall(r"configs/[\w.-]+\.json", prose))
        assert path != README or names, "README names no bundle config in its text"
        for name in names:
            homes = [path.parents[1]] if path != README else [b.parent for b in bundles]
            assert any((home / name).is_file() for home in homes), f"{path}: {name} is in no bundle"
