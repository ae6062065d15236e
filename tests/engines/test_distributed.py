"""Distributed meta-training on the CPU (gloo, 2 processes): 2 ranks x B tasks give the update of 1 process x 2B
tasks, each rank trains on its own episodes of every meta-batch, and the bundles' multi_gpu_train.json runs under
torchrun with one checkpoint writer.

The learners train on real organ patches of the two TotalSegmentator CTs (liver, spleen, pancreas; 3 mm, 16^3)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ignite.engine import Events

from monai_metalearn.data import ClassificationEpisodeDataset, episode_loader, patch_transforms, render_patches
from monai_metalearn.engines import (
    DistributedEpisodeSampler,
    MetaGradientSync,
    MetaTrainer,
    distributed_episode_loader,
    init_distributed,
    local_device,
)
from monai_metalearn.errors import ConfigError, MetaLearnError

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = {name: ROOT / "bundles" / f"fewshot_{name}_3d" for name in ("classification", "segmentation")}
LEARNERS = ("protonet", "maml", "fomaml", "reptile")
PER_RANK = 2  # B tasks per rank and meta-update; the single process takes 2B
NUM_EPISODES = 8  # 2 meta-updates of 4 tasks per epoch
EPOCHS = 2
ATOL = 1e-5

pytestmark = pytest.mark.xdist_group("distributed")


# ------------------------------------------------------------------------------------------------ shared set-up
@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def rendered(data_dir):
    """Fixed 16^3 views of liver, spleen and pancreas in the two real CTs: 4 examples per class."""
    from monai_metalearn.apps import classification as app

    patches = app.load_structure_patches(str(data_dir), ["totalseg_ct1", "totalseg_ct2"],
                                         ["liver", "spleen", "pancreas"], (3.0, 3.0, 3.0), n_views=2, progress=False)
    items = render_patches(patches, patch_transforms((16, 16, 16)), seed=0, progress=False)
    return [{"image": torch.as_tensor(it["image"]).float().clone(), "class": it["class"], "subject": it["subject"]}
            for it in items]


def _episodes(items: list[dict]) -> ClassificationEpisodeDataset:
    return ClassificationEpisodeDataset(items, n_way=3, k_shot=1, q_query=1, num_episodes=NUM_EPISODES, seed=3)


def _learner(name: str) -> torch.nn.Module:
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    torch.manual_seed(0)
    encoder = ConvEncoder3D(in_channels=1, features=(4, 8), norm="group", num_groups=2)
    kwargs = {"maml": {"inner_lr": 0.1, "inner_steps": 1}, "fomaml": {"inner_lr": 0.1, "inner_steps": 2},
              "reptile": {"inner_lr": 0.05, "inner_steps": 2, "epsilon": 0.5}}.get(name, {})
    return create_learner(name, encoder, 8, 3, **kwargs)


def _train(name: str, loader, distributed: bool) -> dict:
    """A few meta-updates of learner ``name``; its final weights, the episodes of each step and the last output."""
    learner = _learner(name)
    initial = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    trainer = MetaTrainer("cpu", EPOCHS, loader, learner, torch.optim.Adam(learner.parameters(), 1e-2),
                          distributed=distributed)
    seen: list[list[int]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.append([ep["episode"] for ep in e.state.batch]))
    trainer.run()
    return {"state": {k: v.detach().clone() for k, v in learner.state_dict().items()}, "initial": initial,
            "seen": seen, "output": dict(trainer.state.output[0]), "episode": trainer.state.episode,
            "iteration": trainer.state.iteration}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- the rank worker
def _worker(rank: int, world: int, port: int, items: list[dict], out: str) -> None:
    """One rank: every learner trained on this rank's share, then the collectives' edge cases."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from monai_metalearn.engines import distributed as D

    assert init_distributed("gloo") is True and init_distributed("gloo") is False  # the second call: already set up
    result: dict = {"rank": D.get_rank(), "world": D.get_world_size(), "main": D.is_main_process()}
    for name in LEARNERS:
        loader = distributed_episode_loader(_episodes(items), meta_batch_size=PER_RANK * world)
        result[name] = _train(name, loader, distributed=True)

    # float16-style loss scaling: an overflow on one rank only makes every rank skip the step
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 1)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    sync = MetaGradientSync(lin, opt)
    scaler = sync.grad_scaler("cpu", init_scale=4.0)
    x = torch.full((1, 2), rank + 1.0)  # weight gradient [r + 1, r + 1]: 1.5 on average, bias gradient 1
    scales, weights = [], []
    for step in range(2):
        opt.zero_grad()
        scaler.scale(lin(x).sum()).backward()
        if step == 0 and rank == 1:
            lin.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(float(scaler.get_scale()))
        weights.append((lin.weight.detach().clone(), lin.bias.detach().clone()))
    sync.close()
    result["scaler"] = {"w0": w0, "b0": b0, "scales": scales, "weights": weights}

    # gradients missing on some ranks count as zero there; missing on all ranks they stay None
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    if rank == 1:
        a.grad = torch.full((3,), 4.0)
    result["with_grad"] = D.all_reduce_gradients([a, b])
    result["a_grad"], result["b_grad"] = a.grad.clone(), b.grad

    result["metrics"] = D.reduce_step_metrics({"loss": rank + 1.0, "tasks": 2.0, "note": f"rank {rank}"}, 2)
    try:
        D.reduce_step_metrics({"loss": 1.0}, rank + 1)
    except MetaLearnError as e:
        result["unequal"] = str(e)
    dist.barrier()
    D.destroy_distributed()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def two_ranks(rendered, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(_worker, args=(2, _free_port(), rendered, str(out)), nprocs=2, join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank gloo run did not finish within 300 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def one_process(rendered):
    """The same learners in one process with meta-batches of 2B tasks."""
    return {name: _train(name, episode_loader(_episodes(rendered), meta_batch_size=2 * PER_RANK), False)
            for name in LEARNERS}


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", LEARNERS)
def test_two_ranks_of_b_tasks_equal_one_process_of_2b_tasks(two_ranks, one_process, name):
    single, r0, r1 = one_process[name], two_ranks[0][name], two_ranks[1][name]
    assert single["iteration"] == r0["iteration"] == r1["iteration"] == EPOCHS * NUM_EPISODES // (2 * PER_RANK)
    moved = max(float((single["state"][k] - single["initial"][k]).abs().max()) for k in single["state"])
    assert moved > 1e-3, f"{name}: training hardly changed the weights ({moved})"
    for k, v in single["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{name}: the ranks' replicas differ in {k}"
        diff = float((r0["state"][k] - v).abs().max())
        assert diff <= ATOL, f"{name}: {k} differs from the single process by {diff}"
    # the statistics and the episode count are those of the global meta-batch on every rank
    assert r0["episode"] == r1["episode"] == single["episode"] == EPOCHS * NUM_EPISODES
    assert r0["output"] == r1["output"]
    for key, value in single["output"].items():
        assert r0["output"][key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.parametrize("name", LEARNERS)
def test_each_rank_trains_on_its_own_episodes_of_every_meta_batch(two_ranks, one_process, name):
    single, r0, r1 = one_process[name]["seen"], two_ranks[0][name]["seen"], two_ranks[1][name]["seen"]
    assert len(single) == len(r0) == len(r1) == 4
    for step, (a, b, s) in enumerate(zip(r0, r1, single)):
        assert len(a) == len(b) == PER_RANK and len(s) == 2 * PER_RANK
        assert not set(a) & set(b), f"step {step}: both ranks trained on episodes {set(a) & set(b)}"
        assert sorted(a + b) == sorted(s), f"step {step}: ranks {a} + {b} != single process {s}"
        assert a == s[0::2] and b == s[1::2]  # rank r takes episodes r, r + W, ... of the meta-batch
    assert set(sum(r0[:2], [])).isdisjoint(sum(r0[2:], []))  # the second epoch brings new episodes


def test_rank_helpers(two_ranks):
    assert [r["rank"] for r in two_ranks] == [0, 1]
    assert [r["world"] for r in two_ranks] == [2, 2] and [r["main"] for r in two_ranks] == [True, False]


def test_loss_scaling_skips_an_overflow_on_every_rank(two_ranks):
    for r in two_ranks:
        s = r["scaler"]
        assert s["scales"] == [2.0, 2.0]  # halved after the overflow, unchanged after a good step (growth later)
        (w1, b1), (w2, b2) = s["weights"]
        assert torch.equal(w1, s["w0"]) and torch.equal(b1, s["b0"])  # the overflowing step was skipped
        assert torch.allclose(w2, s["w0"] - 0.1 * 1.5, atol=1e-6) and torch.allclose(b2, s["b0"] - 0.1, atol=1e-6)
    assert torch.equal(two_ranks[0]["scaler"]["weights"][1][0], two_ranks[1]["scaler"]["weights"][1][0])


def test_gradients_missing_on_a_rank_count_as_zero(two_ranks):
    for r in two_ranks:
        assert r["with_grad"] == 1
        assert torch.equal(r["a_grad"], torch.full((3,), 2.0)) and r["b_grad"] is None


def test_metrics_are_averaged_over_all_tasks_and_counts_summed(two_ranks):
    for r in two_ranks:
        assert r["metrics"] == ({"loss": 1.5, "tasks": 4.0, "note": f"rank {r['rank']}"}, 4)
        assert "different numbers of tasks in one step ([1, 2])" in r["unequal"]


# ------------------------------------------------------------------------------------------ sampler and errors
def test_sampler_shares_partition_the_single_process_meta_batches(rendered):
    dataset = _episodes(rendered)
    dataset.set_epoch(1)
    single = [[ep["episode"] for ep in batch] for batch in episode_loader(dataset, meta_batch_size=4)]
    shares = [[[ep["episode"] for ep in batch]
               for batch in distributed_episode_loader(dataset, 4, num_replicas=2, rank=r)] for r in range(2)]
    assert len(single) == len(shares[0]) == len(shares[1]) == 2
    for a, b, s in zip(*shares, single):
        assert a == s[0::2] and b == s[1::2]  # interleaved shares of the same meta-batch
    assert all(ep >= NUM_EPISODES for batch in single for ep in batch)  # epoch 1: the episodes after epoch 0's
    sampler = DistributedEpisodeSampler(dataset, 4, num_replicas=2, rank=1)
    assert sampler.indices() == [1, 3, 5, 7] and len(sampler) == 4 and list(sampler)[0] == (1, 1)
    one_each = DistributedEpisodeSampler(list(range(6)), None, num_replicas=3, rank=2)
    assert list(one_each) == [2, 5] and one_each.per_rank is None


def test_sampler_errors_and_leftover_episodes(rendered, caplog):
    dataset = _episodes(rendered)
    with pytest.raises(ConfigError, match=r"meta_batch_size=3 must be a positive multiple of the number of processes"):
        DistributedEpisodeSampler(dataset, 3, num_replicas=2, rank=0)
    with pytest.raises(ConfigError, match=r"has 8 episode\(s\), fewer than one meta-batch of 16"):
        DistributedEpisodeSampler(dataset, 16, num_replicas=2, rank=0)
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.1, got 2"):
        DistributedEpisodeSampler(dataset, 2, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="drop 'shuffle'"):
        distributed_episode_loader(dataset, 2, num_replicas=2, rank=0, shuffle=True)
    with caplog.at_level(logging.WARNING):
        sampler = DistributedEpisodeSampler(dataset, 6, num_replicas=2, rank=0)
    assert sampler.indices() == [0, 2, 4] and "the last 2 are left out" in caplog.text


def test_without_torchrun_or_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"missing \['RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\].*torchrun"):
        init_distributed("gloo")
    learner = _learner("protonet")
    with pytest.raises(ConfigError, match="distributed=True needs an initialised torch.distributed process group"):
        MetaTrainer("cpu", 1, [], learner, torch.optim.Adam(learner.parameters()), distributed=True)
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError, match="LOCAL_RANK must be an integer, got 'x'"):
        local_device()
    monkeypatch.setenv("LOCAL_RANK", "1")
    if torch.cuda.device_count() == 1:
        with pytest.raises(ConfigError, match="LOCAL_RANK=1 but this machine has 1 CUDA device"):
            local_device()
    else:
        assert local_device() == (torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ bundle configs
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_multi_gpu_config_keeps_train_json_steps_and_disables_rank_handlers(bundle):
    from monai.bundle import ConfigParser

    configs = BUNDLES[bundle] / "configs"
    train = json.loads((configs / "train.json").read_text())
    multi = json.loads((configs / "multi_gpu_train.json").read_text())
    init = multi["initialize"]
    assert [s for s in init if "init_distributed" not in s] == train["initialize"]  # nothing of train.json dropped
    assert init.index("$monai_metalearn.engines.init_distributed(@dist_backend)") < init.index(
        "$monai.utils.set_determinism(seed=@seed)")
    assert [r.replace(" if @is_main else None", "") for r in multi["run"]] == train["run"]  # rank 0 saves resume state
    merged = ConfigParser.load_config_files([configs / "train.json", configs / "multi_gpu_train.json"])
    off = "$not @is_main"
    for section in ("train", "validate"):
        assert [h.get("_disabled_") for h in merged[section]["handlers"]] == [off] * len(train[section]["handlers"])
    assert merged["train"]["resume_saver"]["_disabled_"] == off and merged["train"]["trainer"]["distributed"] is True
    assert "distributed_episode_loader" in merged["train"]["dataloader"]
    parser = ConfigParser(merged)
    assert parser.get_parsed_content("is_main") is True and parser.get_parsed_content("device") == local_device()


# ------------------------------------------------------------------------------------- the bundle under torchrun
SMALL = [
    "--sources", "['totalseg_ct1','totalseg_ct2']",
    "--train_classes", "['rib_left_7','rib_left_8','rib_left_9','rib_right_7','rib_right_8','rib_right_9']",
    "--test_classes", "['liver','spleen','stomach','pancreas','aorta']",
    "--n_views", "6", "--pixdim", "[3.0,3.0,3.0]", "--features", "[8,16,16,16]",
    "--episodes_per_epoch", "2", "--meta_batch_size", "2", "--q_query", "2",
    "--val_episodes", "2", "--val_q_query", "2", "--progress", "False", "--epochs", "1",
]


def _bundle(launcher: list[str], configs: list[str], out: Path, *args: str) -> subprocess.CompletedProcess:
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", files, "--output_dir", str(out),
           "--ckpt_path", str(out / "model.pt"), "--cache_dir", str(out.parent / "cache"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a session of its own, so that a run past the time limit is stopped with all its ranks
    proc = subprocess.Popen(cmd, cwd=BUNDLES["classification"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish within 300 s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_torchrun_bundle_matches_one_process_and_writes_one_checkpoint(tmp_path, data_dir):
    single = tmp_path / "single"
    _ok(_bundle([sys.executable], ["train.json"], single, *SMALL))  # also fills the shared patch cache
    multi = tmp_path / "multi"
    proc = _ok(_bundle(TORCHRUN, ["train.json", "multi_gpu_train.json"], multi, *SMALL))
    log = proc.stdout + proc.stderr
    assert log.count("Epoch: 1/1, Iter: 2/2 -- train_loss") == 1  # the StatsHandler of rank 0 only
    printed = [line for line in log.splitlines() if line.startswith("checkpoint: ")]
    assert printed == [f"checkpoint: {multi / 'model.pt'}"]
    # one writer: the files of one process, as a single-process run writes them
    assert sorted(p.name for p in multi.glob("*.pt")) == sorted(p.name for p in single.glob("*.pt")) == [
        "model.pt", "model_best_val.pt"]
    assert len(list((multi / "resume").glob("*.pt"))) == 1
    events = list(multi.glob("events.out.tfevents.*"))
    assert len(events) == len(list(single.glob("events.out.tfevents.*")))
    assert len({e.name.split(".")[-2] for e in events}) == 1  # all written by one process (its pid)
    a, b = torch.load(single / "model.pt", weights_only=True), torch.load(multi / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= ATOL, f"2 ranks x 1 task vs 1 process x 2 tasks: weights differ by {diff}"
    resume = torch.load(next((multi / "resume").glob("*.pt")), weights_only=False)
    assert resume["trainer"]["iteration"] == 2 and resume["trainer"]["episode"] == 4  # global episodes
    # the checkpoint of the distributed run is a normal one: evaluate.json loads and scores it
    _ok(_bundle([sys.executable], ["train.json", "evaluate.json"], multi, *SMALL, "--test_episodes", "2",
                "--test_q_query", "2", "--test_shots", "[1]"))
    metrics = json.loads((multi / "metrics.json").read_text())
    assert metrics["by_shot"]["1"]["accuracy"]["n_episodes"] == 2


def test_multi_gpu_config_without_torchrun_is_a_one_line_error(tmp_path):
    proc = _bundle([sys.executable], ["train.json", "multi_gpu_train.json"], tmp_path / "x", "--progress", "False")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("monai-metalearn: error: distributed training (multi_gpu_train.json) needs the "
                           "environment torchrun sets") and "torchrun --standalone --nproc_per_node" in last
