"""Checkpoints that survive a crash: ``kill -9`` of a real meta-training run (the classification bundle on the real
CT scans) and ``--resume_from`` its last checkpoint continue it exactly, episode count and Adam state included;
a checkpoint killed while it was being written never replaces the previous one; a truncated file is a
``CheckpointError`` naming it, from the Python API and as one line from the bundles' command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from monai_metalearn.apps import classification as cls_app
from monai_metalearn.apps import segmentation as seg_app
from monai_metalearn.engines import (
    AtomicDiskSaver,
    MetaTrainer,
    SafeCheckpointLoader,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from monai_metalearn.errors import CheckpointError, ConfigError, MissingFileError

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "bundles"
CLS = BUNDLES / "fewshot_classification_3d"
SEG = BUNDLES / "fewshot_segmentation_3d"

EPOCHS, EPISODES = 3, 3  # 3 epochs of 3 one-episode iterations, about 1 s per epoch on one CPU thread
# small real-data settings: the two CTs, ribs as meta-train classes, a small encoder
SETTINGS = {
    "sources": ["totalseg_ct1", "totalseg_ct2"],
    "train_classes": ["rib_left_7", "rib_left_8", "rib_left_9", "rib_right_7", "rib_right_8", "rib_right_9"],
    "test_classes": ["liver", "spleen", "stomach", "pancreas", "aorta"],
    "n_views": 6, "pixdim": [3.0, 3.0, 3.0], "features": [8, 16, 16, 16],
    "episodes_per_epoch": EPISODES, "meta_batch_size": 1, "q_query": 2,
    "val_episodes": 2, "val_q_query": 2, "progress": False, "epochs": EPOCHS, "learner_name": "protonet",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.xdist_group("checkpoint_resume")


def cli(configs: list[str], out: Path, cache: Path, *args: str, bundle: Path = CLS) -> list[str]:
    """``python -m monai.bundle run --config_file [...]`` with the small settings (for the classification bundle)."""
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    settings = [a for k, v in SETTINGS.items() for a in (f"--{k}", repr(v))] if bundle == CLS else []
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--output_dir", str(out),
            "--ckpt_path", str(out / "model.pt"), "--cache_dir", str(cache), *settings, *args]


def run_cli(cmd: list[str], bundle: Path = CLS) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=bundle, env=ENV, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def parser_for(bundle: Path, **overrides) -> ConfigParser:
    """The bundle's ``train.json`` in this process, with ``overrides``: the same objects the command line builds."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def assert_same_state(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors and numbers are equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def adam_steps(optimizer_state: dict) -> set[float]:
    return {float(s["step"]) for s in optimizer_state["state"].values()}


def small_parser(cache: Path, output_dir: Path, **overrides) -> ConfigParser:
    """The classification bundle's ``train.json`` with the small settings, as the command line builds it."""
    return parser_for(CLS, **SETTINGS, data_dir=os.environ["MONAI_DATA_DIRECTORY"], output_dir=str(output_dir),
                      cache_dir=str(cache), **overrides)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_dir) -> Path:
    """The patch cache of the small settings, filled once (in this process) for the command-line runs."""
    folder = tmp_path_factory.mktemp("checkpoint_cache")
    assert small_parser(folder, folder / "unused").get_parsed_content("patches")
    assert list(folder.glob("patches_*.pt"))
    return folder


@pytest.fixture()
def real_learner():
    """The classification bundle's learner (small encoder), built by its config."""
    return parser_for(CLS, features=SETTINGS["features"]).get_parsed_content("learner")


# --- the Python API -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["half", "empty", "last_bytes"])
def test_truncated_checkpoint_is_a_checkpoint_error_naming_the_file(real_learner, tmp_path, cut):
    opt = torch.optim.Adam(real_learner.parameters(), 1e-3)
    for p in real_learner.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # a checkpoint with Adam moments, like the resume checkpoints
    full = save_checkpoint({"learner": real_learner.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "full.pt")
    assert set(load_checkpoint(full)) == {"learner", "optimizer"}  # the whole file reads
    data = full.read_bytes()
    bad = tmp_path / f"{cut}.pt"
    bad.write_bytes({"half": data[: len(data) // 2], "empty": b"", "last_bytes": data[:-16]}[cut])
    message = re.escape(f"checkpoint {str(bad)!r} cannot be read")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)
    # the trainer's resume loader stops when it is attached, before the run starts
    with pytest.raises(CheckpointError, match=message):
        SafeCheckpointLoader(str(bad), {"learner": real_learner, "optimizer": opt}).attach(Engine(lambda e, b: None))
    # evaluate / inference: the classification and segmentation apps' loaders
    with pytest.raises(CheckpointError, match=message):
        cls_app.load_learner(real_learner, str(bad))


def test_segmentation_load_learner_truncated_checkpoint(tmp_path):
    learner = parser_for(SEG).get_parsed_content("learner")
    assert getattr(learner, "trainable", True), "the default segmentation learner loads a checkpoint"
    full = save_checkpoint({"learner": learner.state_dict()}, tmp_path / "model.pt")
    other = parser_for(SEG).get_parsed_content("learner")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    assert_same_state(seg_app.load_learner(other, str(full)).state_dict(), learner.state_dict())
    data = full.read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(bad)!r} cannot be read")):
        seg_app.load_learner(other, str(bad))
    with pytest.raises(MissingFileError, match="nowhere.pt"):
        seg_app.load_learner(other, str(tmp_path / "nowhere.pt"))


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"learner": {"w": torch.zeros(2)}, "extra": Path("x")}, path)  # a pickled class instance
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(path)!r} holds objects other than tensors "
                                                        "and plain containers (pathlib.")):
        load_checkpoint(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(garbage)!r} cannot be read (16 bytes;")):
        load_checkpoint(garbage)


def test_loader_checks_keys_shapes_and_epochs_when_attached(real_learner, tmp_path):
    opt = torch.optim.Adam(real_learner.parameters(), 1e-3)
    trainer = MetaTrainer("cpu", max_epochs=3, train_data_loader=[{}], learner=real_learner, optimizer=opt)
    state = {"learner": real_learner.state_dict(), "optimizer": opt.state_dict(), "trainer": trainer.state_dict()}
    load_dict = {"learner": real_learner, "optimizer": opt, "trainer": trainer}

    no_opt = save_checkpoint({"learner": state["learner"]}, tmp_path / "no_opt.pt")
    with pytest.raises(CheckpointError, match=r"has no \['optimizer', 'trainer'\]"):
        SafeCheckpointLoader(str(no_opt), load_dict).attach(trainer)

    wider = parser_for(CLS, features=[8, 16, 16, 32]).get_parsed_content("learner")
    wrong = save_checkpoint({**state, "learner": wider.state_dict()}, tmp_path / "wider.pt")
    with pytest.raises(CheckpointError, match=r"'learner' does not fit ProtoNet .*other shape \['encoder\."):
        SafeCheckpointLoader(str(wrong), load_dict).attach(trainer)

    assert state["trainer"]["epoch_length"] == 1
    late = save_checkpoint({**state, "trainer": {**state["trainer"], "iteration": 5}}, tmp_path / "late.pt")
    with pytest.raises(ConfigError, match="at epoch 5, beyond the trainer's max_epochs 3: pass --epochs 6"):
        SafeCheckpointLoader(str(late), load_dict).attach(trainer)

    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(MissingFileError, match="empty_folder' holds no .pt checkpoint"):
        SafeCheckpointLoader(str(tmp_path / "empty_folder"), load_dict).attach(trainer)
    with pytest.raises(MissingFileError, match="nowhere.pt' not found"):
        SafeCheckpointLoader(str(tmp_path / "nowhere.pt"), load_dict).attach(trainer)
    assert trainer.state.iteration == 0  # nothing was loaded by the failed attempts


def test_a_folder_resumes_from_its_newest_checkpoint(tmp_path):
    for epoch in (2, 10, 9):  # numeric order, not file-name order
        save_checkpoint({"model": {"w": torch.full((2,), float(epoch))}}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=10.pt"
    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(2))
    engine = Engine(lambda e, b: None)
    SafeCheckpointLoader(str(tmp_path), {"model": model}).attach(engine)
    engine.run([0], max_epochs=1)
    assert model.w.tolist() == [10.0, 10.0]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("serialisation failed half-way")


def test_atomic_saver_keeps_the_previous_file_until_the_next_is_complete(tmp_path):
    fixed = AtomicDiskSaver(tmp_path, filename="model_best_val.pt")
    fixed({"w": torch.ones(3)}, "ignored.pt")
    with pytest.raises(RuntimeError, match="half-way"):
        fixed({"w": torch.zeros(3), "bad": _Unpicklable()}, "ignored.pt")
    assert load_checkpoint(tmp_path / "model_best_val.pt")["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best_val.pt"]  # no temporary file left

    rolling = AtomicDiskSaver(tmp_path / "resume")
    rolling({"epoch": 1}, "checkpoint_epoch=1.pt")
    rolling.remove("checkpoint_epoch=1.pt")  # what ignite's Checkpoint(n_saved=1) does before the next save
    assert (tmp_path / "resume" / "checkpoint_epoch=1.pt").is_file()
    with pytest.raises(RuntimeError, match="half-way"):
        rolling({"epoch": 2, "bad": _Unpicklable()}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["checkpoint_epoch=1.pt"]
    rolling({"epoch": 3}, "checkpoint_epoch=3.pt")
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["checkpoint_epoch=3.pt"]


# --- real processes killed with SIGKILL ---------------------------------------------------------------------------

# A trainer whose checkpoint of epoch 2 blocks half-way through serialisation, so that SIGKILL lands mid-write.
_KILLED_WHILE_SAVING = textwrap.dedent("""
    import sys, time
    import torch
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver
    from monai_metalearn.engines import AtomicCheckpointSaver

    class Blocks:
        def __reduce__(self):
            print("writing", flush=True)
            time.sleep(120)
            return (int, (0,))

    engine = Engine(lambda e, b: None)

    class Weights:
        def state_dict(self):
            state = {"w": torch.full((512, 512), float(engine.state.epoch))}
            if engine.state.epoch == 2:
                state["slow"] = Blocks()
            return state

        def load_state_dict(self, state):
            pass

    saver = AtomicCheckpointSaver if sys.argv[2] == "atomic" else CheckpointSaver
    saver(sys.argv[1], {"model": Weights()}, save_interval=1, epoch_level=True, n_saved=1).attach(engine)
    engine.run([0], max_epochs=3)
""")


@pytest.mark.slow
def test_kill_9_while_saving_leaves_the_previous_checkpoint(tmp_path):
    found = {}
    for kind in ("atomic", "monai"):
        folder = tmp_path / kind
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_SAVING, str(folder), kind], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = proc.stdout.readline()
            assert line.strip() == "writing", line + proc.stdout.read()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        found[kind] = sorted(p.name for p in folder.iterdir())
        if kind == "atomic":
            # epoch 1's checkpoint is whole and still there; epoch 2's never reached its name
            assert "model_epoch=1.pt" in found[kind] and "model_epoch=2.pt" not in found[kind], found
            assert load_checkpoint(folder / "model_epoch=1.pt")["w"].unique().tolist() == [1.0]
            assert [n for n in found[kind] if n.endswith(".tmp")], found  # the kill did land mid-write
        else:
            # MONAI's saver: epoch 1 deleted before epoch 2 was written, and epoch 2 is a truncated file
            assert found[kind] == ["model_epoch=2.pt"], found
            with pytest.raises(CheckpointError, match="cannot be read"):
                load_checkpoint(folder / "model_epoch=2.pt")


@pytest.mark.slow
def test_kill_9_during_meta_training_then_resume_continues_exactly(cache, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted run and the one to kill, side by side
    with (tmp_path / "reference.log").open("w") as ref_log, (tmp_path / "killed.log").open("w") as log:
        uninterrupted = subprocess.Popen(cli(["train.json"], reference, cache), cwd=CLS, env=ENV, stdout=ref_log,
                                         stderr=subprocess.STDOUT)
        proc = subprocess.Popen(cli(["train.json"], killed, cache), cwd=CLS, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not list((killed / "resume").glob("checkpoint_epoch=*.pt")):
                text = (tmp_path / "killed.log").read_text()[-3000:]
                assert proc.poll() is None, f"training ended before an epoch was saved:\n{text}"
                assert time.monotonic() < deadline, "no resume checkpoint after 300 s"
                time.sleep(0.02)
            time.sleep(0.3)  # into the next epoch: what it trained since the checkpoint is lost with the process
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
        finally:
            for p in (proc, uninterrupted):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert not (killed / "model.pt").exists(), "the run finished before it was killed"
    last = latest_checkpoint(killed / "resume")
    saved = load_checkpoint(last)  # whole: it was written atomically
    epoch = int(last.name[len("checkpoint_epoch="):-len(".pt")])
    assert 1 <= epoch < EPOCHS, f"killed after epoch {epoch} of {EPOCHS}"
    assert saved["trainer"]["epoch_length"] == EPISODES
    assert saved["trainer"]["iteration"] == saved["trainer"]["episode"] == epoch * EPISODES
    assert adam_steps(saved["optimizer"]) == {float(epoch * EPISODES)}

    # what the bundle's train#resume_loader restores into freshly built objects: exactly what was saved
    parser = small_parser(cache, tmp_path / "in_process", resume_from=str(last))
    loader = parser.get_parsed_content("train#resume_loader")
    trainer, optimizer = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#optimizer")
    assert optimizer.state_dict()["state"] == {} and trainer.state.iteration == 0
    loader(trainer)
    assert (trainer.state.epoch, trainer.state.iteration, trainer.state.episode) == (epoch, epoch * EPISODES,
                                                                                   epoch * EPISODES)
    assert_same_state(optimizer.state_dict(), saved["optimizer"], "optimizer")
    assert_same_state(parser.get_parsed_content("learner").state_dict(), saved["learner"], "learner")

    # resume from the command line, as documented (the folder: its newest checkpoint): it starts at the saved epoch
    # and ends where the uninterrupted run ended
    resumed = tmp_path / "resumed"
    proc = ok(run_cli(cli(["train.json"], resumed, cache, "--resume_from", str(killed / "resume"))))
    text = proc.stdout + proc.stderr
    assert f"Restored all variables from {last} (epoch {epoch}, iteration {epoch * EPISODES})" in text
    assert f"Epoch: {epoch + 1}/{EPOCHS}, Iter: 1/{EPISODES}" in text
    assert f"Epoch: {epoch}/{EPOCHS}, Iter:" not in text and f"Epoch: 1/{EPOCHS}, Iter:" not in text

    # the episodes are functions of (seed, epoch, index) and the run is single-threaded on the CPU, so the resumed
    # run must end bit for bit where the uninterrupted one did: weights, Adam moments and step counts, counters
    final = load_checkpoint(resumed / "resume" / f"checkpoint_epoch={EPOCHS}.pt")
    expected = load_checkpoint(reference / "resume" / f"checkpoint_epoch={EPOCHS}.pt")
    assert final["trainer"]["iteration"] == final["trainer"]["episode"] == EPOCHS * EPISODES
    assert adam_steps(final["optimizer"]) == {float(EPOCHS * EPISODES)}  # a fresh Adam would count fewer steps
    assert_same_state(final["trainer"], expected["trainer"], "trainer")
    assert_same_state(final["optimizer"], expected["optimizer"], "optimizer")
    assert_same_state(final["learner"], expected["learner"], "learner")
    assert_same_state(load_checkpoint(resumed / "model.pt"), load_checkpoint(reference / "model.pt"), "model.pt")


# --- the command line: one line, exit status 1, no traceback ------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("monai-metalearn: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_cli_resume_from_a_truncated_checkpoint_is_one_line(cache, tmp_path):
    parser = small_parser(cache, tmp_path / "in_process")
    learner, optimizer = parser.get_parsed_content("learner"), parser.get_parsed_content("train#optimizer")
    full = save_checkpoint({"learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                            "trainer": parser.get_parsed_content("train#trainer").state_dict()}, tmp_path / "full.pt")
    data = full.read_bytes()
    bad = tmp_path / "checkpoint_epoch=2.pt"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    line = one_line_error(run_cli(cli(["train.json"], out, cache, "--resume_from", str(bad))))
    assert line.startswith(f"monai-metalearn: error: checkpoint {str(bad)!r} cannot be read"), line
    assert not (out / "model.pt").exists()  # stopped before training: no model written from untrained weights


@pytest.mark.slow
@pytest.mark.parametrize("bundle", [CLS, SEG], ids=["classification", "segmentation"])
def test_cli_evaluate_with_a_truncated_checkpoint_is_one_line(bundle, tmp_path):
    parser = parser_for(bundle, **({"features": SETTINGS["features"]} if bundle == CLS else {}))
    full = save_checkpoint(parser.get_parsed_content("learner").state_dict(), tmp_path / "full.pt")
    out = tmp_path / "run"
    out.mkdir()
    data = full.read_bytes()
    (out / "model.pt").write_bytes(data[: len(data) // 2])
    proc = run_cli(cli(["train.json", "evaluate.json"], out, tmp_path / "cache", bundle=bundle), bundle=bundle)
    line = one_line_error(proc)
    assert line.startswith(f"monai-metalearn: error: checkpoint {str(out / 'model.pt')!r} cannot be read"), line
