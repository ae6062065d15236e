"""Typed errors: library functions raise them (never exit), and the bundle entry points print them in one line."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from monai_metalearn import cli
from monai_metalearn.apps import classification as app
from monai_metalearn.apps.protocols import ProtocolError
from monai_metalearn.data import ScanLoadError
from monai_metalearn.errors import ConfigError, DataError, MetaLearnError, MissingFileError
from monai_metalearn.transforms import BodyFrameError

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fewshot_classification_3d"


def test_library_functions_raise_typed_errors_and_never_exit(tmp_path):
    with pytest.raises(MissingFileError, match="no data_dir") as info:
        app.check_data_dir(None)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingFileError, match=str(tmp_path / "none.pt")):
        app.check_checkpoint(tmp_path / "none.pt")
    with pytest.raises(ConfigError, match="class split 'val' is empty") as info:
        app.check_class_splits(train=["a"], val=[])
    assert isinstance(info.value, ValueError)
    with pytest.raises(DataError, match=r"unknown sources \['nope'\]"):
        app.load_structure_patches(str(tmp_path), ["nope"], ["liver"])
    # the package's other error types belong to the hierarchy
    assert issubclass(ProtocolError, ConfigError) and issubclass(BodyFrameError, DataError)
    assert issubclass(ScanLoadError, MetaLearnError)


def test_typed_error_is_found_through_wrapping():
    try:
        try:
            raise ConfigError("unknown config key --epoch")
        except ConfigError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err
    except RuntimeError as wrapped:
        found = cli.typed_error(wrapped)
    assert isinstance(found, ConfigError) and str(found) == "unknown config key --epoch"
    assert cli.typed_error(RuntimeError("other")) is None


def test_hook_prints_one_line_for_typed_errors_and_keeps_tracebacks_for_others(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[1]))
    cli.one_line_errors()
    cli.one_line_errors()  # installed once
    hook = sys.excepthook
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            raise RuntimeError("wrapper") from DataError("structure 'liver' is in no subject")
        except RuntimeError as wrapped:
            hook(type(wrapped), wrapped, wrapped.__traceback__)
    assert err.getvalue() == "monai-metalearn: error: structure 'liver' is in no subject\n"
    other = KeyError("x")
    hook(KeyError, other, None)
    assert seen == [other]  # not ours: the previous hook (the traceback) handles it


def test_bundle_cli_prints_the_typed_error_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
           "--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("monai-metalearn: error: data_dir ") and "missing" in last and "is not a folder" in last
    assert "Traceback" not in proc.stderr
