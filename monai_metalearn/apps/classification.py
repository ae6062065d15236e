"""Few-shot 3D structure classification on the real scans: the glue used by the bundle, the demo and the notebook.

The functions here are referenced from ``bundles/fewshot_classification_3d/configs/*.json``; each one does one
step a MONAI user would otherwise write by hand (build the structure patches of several sources, check that the
data dir / checkpoint / task file make sense and say so in one line when they don't, write ``metrics.json`` and
``predictions.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from monai_metalearn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MetaLearnError,
    MissingFileError,
    TaskFileError,
)

__all__ = [
    "fail",
    "flag",
    "check_data_dir",
    "check_checkpoint",
    "check_class_splits",
    "load_structure_patches",
    "cached",
    "GlobalLabels",
    "build_learner",
    "load_learner",
    "LearnerNetwork",
    "evaluate_shots",
    "evaluate_protocols",
    "check_cli_overrides",
    "prepare_episode_for",
    "write_metrics",
    "load_task_file",
    "read_task_file",
    "inference_transforms",
    "AddBodyBoxd",
    "MaskCropd",
    "predict_task",
]


def fail(message: str, error: type[MetaLearnError] = ConfigError) -> NoReturn:
    """Raises ``error(message)``: a typed :mod:`monai_metalearn.errors` exception naming what is wrong. The bundle
    entry points print it as one line (:func:`monai_metalearn.cli.one_line_errors`); Python callers catch it."""
    raise error(message)


def flag(value: Any, key: str) -> bool:
    """A boolean config value: ``True`` / ``False``, also as the strings a command line gives (``--key false``:
    ``fire`` passes lowercase words through as strings, and the string ``"false"`` is true in Python).

    Raises:
        ConfigError: naming ``key`` for any other value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    fail(f"{key} must be true or false, got {value!r}", ConfigError)


def check_data_dir(path: str | os.PathLike | None) -> str:
    """``path`` as a string if it is a folder, else a one-line error naming it and ``MONAI_DATA_DIRECTORY``."""
    if path is None or str(path) in ("", "None"):
        fail("no data_dir: set MONAI_DATA_DIRECTORY or pass --data_dir /path/to/data", MissingFileError)
    if not Path(path).is_dir():
        fail(f"data_dir {str(path)!r} is not a folder: set MONAI_DATA_DIRECTORY or pass --data_dir /path/to/data",
            MissingFileError)
    return str(path)


def check_checkpoint(path: str | os.PathLike) -> str:
    """``path`` if the checkpoint file exists, else a one-line error (train first, or pass --ckpt_path)."""
    if not Path(path).is_file():
        fail(f"checkpoint {str(path)!r} not found: run train.json first or pass --ckpt_path /path/to/model.pt",
            MissingFileError)
    return str(path)


def check_class_splits(**splits: Sequence[str]) -> dict[str, list[str]]:
    """Checks that the named class lists are non-empty and disjoint; returns them."""
    from monai_metalearn.data import check_disjoint_splits

    for name, classes in splits.items():
        if not classes:
            fail(f"class split {name!r} is empty", ConfigError)
    try:
        check_disjoint_splits(splits)
    except ValueError as err:
        fail(str(err), ConfigError)
    return {k: list(v) for k, v in splits.items()}


def load_structure_patches(
    data_dir: str,
    sources: Sequence[str],
    structures: Sequence[str],
    pixdim: Sequence[float] | None = (2.0, 2.0, 2.0),
    n_views: int = 16,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Structure patches (:func:`~monai_metalearn.data.build_structure_patches`) of several real sources.

    With ``cache_dir``, the patches are saved there (``torch.save``, a file named after a hash of the sources, their
    files' sizes and dates, the structures, ``pixdim`` and ``n_views``) and read back by later runs, as MONAI's
    ``PersistentDataset`` does for transformed items: the demo and the evaluation do not re-read the scans.

    Args:
        data_dir: the folder holding the sources (``MONAI_DATA_DIRECTORY``).
        sources: names of :data:`monai_metalearn.data.SOURCES`.
        structures: every class the run will use (all splits).
        pixdim: common spacing in mm.
        n_views: random views per (subject, structure).
        progress: progress bar.

    Exits with a one-line error for an unknown source, a missing data dir or a structure no source has.
    """
    from monai_metalearn.data import SOURCES, build_structure_patches, load_datalist

    check_data_dir(data_dir)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        fail(f"unknown sources {unknown}; known: {sorted(SOURCES)}", DataError)
    datalist = [item for name in sources for item in load_datalist(name, data_dir)]
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"patches_{_patch_key(datalist, structures, pixdim, n_views)}.pt"

    def build() -> list[dict[str, Any]]:
        try:
            return build_structure_patches(datalist, structures, pixdim=pixdim, n_views=n_views, progress=progress)
        except ValueError as err:
            fail(str(err), DataError)

    return cached(cache_file, build)


def cached(cache_file: Path | None, build: Callable[[], Any]) -> Any:
    """``build()``, saved to ``cache_file`` (``torch.save``, written atomically) and read back by later calls; a
    damaged cache file is rebuilt, never trusted. ``cache_file=None``: no caching."""
    if cache_file is not None and cache_file.is_file():
        try:
            return torch.load(cache_file, weights_only=False)
        except Exception:
            cache_file.unlink(missing_ok=True)
    value = build()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")  # processes that build it at once
        torch.save(value, tmp)
        tmp.replace(cache_file)
    return value


def _patch_key(datalist: Sequence[Mapping[str, Any]], structures: Sequence[str], pixdim: Any, n_views: int) -> str:
    import hashlib

    # the format version: bump when build_structure_patches' items change (2: body_box)
    parts: list[Any] = [2, sorted(structures), list(pixdim) if pixdim is not None else None, n_views]
    for item in datalist:
        if item.get("orientation"):  # a corrected header moves the scan in world space
            parts.append(["orientation", str(item["orientation"])])
        for key in ("image", "label"):
            value = item.get(key)
            if isinstance(value, (str, os.PathLike)) and os.path.exists(str(value).split("#")[0]):
                st = os.stat(str(value).split("#")[0])
                parts.append([str(value), st.st_size, int(st.st_mtime)])
            else:
                parts.append([key, str(item.get("subject"))])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class GlobalLabels:
    """``prepare_episode`` for the fine-tuning baseline's pre-training: episode labels -> global class ids.

    The baseline trains an ordinary classifier over all meta-train classes; fed with episodes, it needs each
    example's class id in ``classes`` rather than its episode-local label.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.index = {c: i for i, c in enumerate(classes)}

    def __call__(self, episode: Mapping[str, Any], device: torch.device, non_blocking: bool = False, **kwargs):
        from monai_metalearn.engines import default_prepare_episode

        sx, sy, qx, qy = default_prepare_episode(episode, device, non_blocking, **kwargs)
        lut = torch.tensor([self.index[c] for c in episode["classes"]], device=sy.device)
        return sx, lut[sy], qx, lut[qy]


def write_metrics(path: str, evaluators: Mapping[Any, Any], **extra: Any) -> dict[str, Any]:
    """Writes ``metrics.json``: one entry per shot setting under ``by_shot``, and the largest one's figures at the
    top level (``accuracy`` / ``dice`` with mean, ci95, n_episodes; ``per_class`` / ``per_structure``).

    Args:
        path: output file.
        evaluators: k_shot -> a :class:`~monai_metalearn.engines.MetaEvaluator` that has run.
        extra: more top-level fields (``n_way``, ``q_query``, ``learner``, ``test_subjects`` ...).
    """
    by_shot = {str(k): dict(ev.state.summary) for k, ev in sorted(evaluators.items(), key=lambda t: int(t[0]))}
    top = max(evaluators, key=int)
    out = {**by_shot[str(top)], "k_shot": int(top), **extra, "by_shot": by_shot}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    return out


def build_learner(
    name: str,
    encoder: torch.nn.Module,
    feature_dim: int,
    n_way: int,
    train_classes: Sequence[str],
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """:func:`~monai_metalearn.learners.create_learner` with the bundle's per-learner defaults, overridden by
    ``overrides`` (``--learner_args "{'inner_lr': 0.05}"``); one-line error for an unknown learner or argument."""
    import inspect

    from monai_metalearn.learners import LEARNERS, create_learner, learner_key
    from monai_metalearn.learners.factory import MEMORY_OPTIONS

    key = learner_key(name)
    if key not in LEARNERS:
        fail(f"unknown learner_name {name!r}; choose one of {sorted(LEARNERS)}", ConfigError)
    kwargs = {**dict((defaults or {}).get(key, {})), **dict(overrides or {})}
    cls = LEARNERS[key][0]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "encoder"}
    accepted |= set(MEMORY_OPTIONS)  # the factory's activation_checkpointing / channels_last
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        fail(f"learner {key!r} has no argument(s) {unknown}; it takes {sorted(accepted)}", ConfigError)
    try:
        return create_learner(key, encoder, feature_dim, n_way, n_base_classes=len(train_classes), **kwargs)
    except (TypeError, ValueError) as err:
        fail(f"learner {key!r}: {err}", ConfigError)


def prepare_episode_for(name: str, train_classes: Sequence[str]):
    """The trainer's ``prepare_episode``: global class ids for the fine-tuning baseline, episode labels otherwise."""
    from monai_metalearn.engines import default_prepare_episode
    from monai_metalearn.learners import learner_key

    return GlobalLabels(train_classes) if learner_key(name) == "finetune" else default_prepare_episode


def load_learner(learner: torch.nn.Module, ckpt_path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Loads the weights that ``train.json`` saved (``{"learner": state}`` or a bare state dict) into ``learner``.

    One-line errors for a missing checkpoint, a truncated or foreign file (``CheckpointError``, read with
    ``torch.load(weights_only=True)``) or one made for another learner / network (names the keys)."""
    from monai_metalearn.engines.checkpoint import load_checkpoint

    check_checkpoint(ckpt_path)
    state = load_checkpoint(ckpt_path, map_location=device)
    if isinstance(state, Mapping) and "learner" in state:
        state = state["learner"]
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        fail(f"checkpoint {ckpt_path!r} does not fit learner {type(learner).__name__} (was it trained with another "
             f"learner_name or features?): {first}", CheckpointError)
    return learner.to(device)


class LearnerNetwork(torch.nn.Module):
    """The network a learner adapts, as a module of its own that loads the learner's checkpoint: what
    ``python -m monai.bundle ckpt_export`` exports (``network_export`` in the bundles' ``train.json``).

    ``train.json`` saves the learner's state dict: the network's weights under the learner's attribute
    (``encoder.`` for ProtoNet, ``model.encoder.`` for the MAML family) plus the learner's own entries (ProtoNet's
    distance ``scale``, a head). ``ckpt_export`` loads the checkpoint file into the module it exports, strictly, so
    the bare network cannot take it. This module holds ``network`` (its only submodule, so its forward pass and its
    TorchScript are the network's) and loads a checkpoint by loading it into ``learner``, which owns ``network``:
    the same check as :func:`load_learner`, and the network's parameters are the learner's.

    Args:
        learner: the learner the checkpoint was written for (the bundle's ``learner``).
        network: the learner's network (the bundle's ``network`` / ``network_def``), a submodule of ``learner``.

    Raises:
        ConfigError: if ``network`` is not a submodule of ``learner``.
    """

    def __init__(self, learner: torch.nn.Module, network: torch.nn.Module) -> None:
        super().__init__()
        if not any(m is network for m in learner.modules()):
            fail(f"the network {type(network).__name__} is not part of the learner {type(learner).__name__}: "
                 "export the learner's own network", ConfigError)
        self.network = network
        self._owner = (learner,)  # a tuple, not a submodule: the learner is not exported

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Loads a learner checkpoint (``{"learner": state}`` or the learner's bare state dict) into the learner, so
        into :attr:`network`; a state dict of this module itself (``network.*`` keys) is loaded as usual.

        Raises:
            CheckpointError: if the state fits neither the learner nor this module.
        """
        if isinstance(state_dict, Mapping) and "learner" in state_dict:
            state_dict = state_dict["learner"]
        target: torch.nn.Module = self._owner[0]
        if state_dict and all(str(k).startswith("network.") for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        try:
            return target.load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:300]
            fail(f"the checkpoint does not fit learner {type(target).__name__} (was it trained with another "
                 f"learner_name or network?): {first}", CheckpointError)


def evaluate_shots(
    learner: torch.nn.Module,
    dataset: Any,
    classes: Sequence[str],
    n_way: int,
    shots: Sequence[int],
    q_query: int,
    num_episodes: int,
    device: str | torch.device,
    output_dir: str,
    seed: int = 0,
    cross_subject: bool = True,
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    support_subjects: Sequence[str] | None = None,
    query_subjects: Sequence[str] | None = None,
    metrics_name: str = "metrics.json",
    **extra: Any,
) -> dict[str, Any]:
    """Meta-test: ``n_way``-way episodes on ``classes`` for each K in ``shots``; writes ``output_dir/metrics_name``.

    ``support_subjects`` / ``query_subjects`` restrict the sides of the cross-subject episodes (e.g. CT support, MR
    query); ``test_subjects`` in the metrics are then the query subjects.

    The same fixed episodes for every learner (seeded by ``seed`` and K). Each K is one
    :class:`~monai_metalearn.engines.MetaEvaluator` run with a ``StatsHandler``; the figures are logged and written
    by :func:`write_metrics` (``extra`` goes to the top level: ``learner``, ``sources`` ...).
    """
    import logging

    from monai.handlers import StatsHandler

    from monai_metalearn.data import ClassificationEpisodeDataset, episode_loader
    from monai_metalearn.engines import MetaEvaluator

    if n_way > len(classes):
        fail(f"n_way={n_way} but only {len(classes)} test classes: {list(classes)}", ConfigError)
    evaluators = {}
    subjects: set[str] = set()
    for k in shots:
        try:
            episodes = ClassificationEpisodeDataset(
                dataset, n_way=n_way, k_shot=int(k), q_query=q_query, num_episodes=num_episodes, classes=classes,
                cross_subject=cross_subject, seed=seed + 1000 * int(k),
                support_subjects=support_subjects, query_subjects=query_subjects,
            )
        except ValueError as err:
            fail(str(err), DataError)
        evaluator = MetaEvaluator(
            device=device, val_data_loader=episode_loader(episodes, num_workers=num_workers), learner=learner,
            amp=amp, progress=progress, val_handlers=[StatsHandler(iteration_log=False, name=f"evaluate_{k}shot")],
        )
        evaluator.run()
        evaluators[int(k)] = evaluator
        logging.getLogger("monai_metalearn").info(
            f"{n_way}-way {k}-shot: accuracy {evaluator.state.metrics['accuracy']:.4f} "
            f"+/- {evaluator.state.metrics['accuracy_ci95']:.4f} over {num_episodes} episodes"
        )
    pool = None if query_subjects is None else {str(s) for s in query_subjects}
    for item in getattr(dataset, "data", dataset):
        if item.get("class") in classes and (pool is None or str(item.get("subject")) in pool):
            subjects.add(str(item.get("subject")))
    return write_metrics(
        str(Path(output_dir) / metrics_name), evaluators, n_way=n_way, q_query=q_query, classes=list(classes),
        test_subjects=sorted(subjects), cross_subject=cross_subject, **extra,
    )


def evaluate_protocols(
    learner: torch.nn.Module,
    patches: Sequence[Mapping[str, Any]],
    protocols: str | Sequence[str],
    folds: Mapping[str, Sequence[Sequence[str]]],
    fold: int,
    shots: Sequence[int],
    q_query: int,
    num_episodes: int,
    device: str | torch.device,
    output_dir: str,
    spatial_size: Sequence[int] = (32, 32, 32),
    body_coordinates: bool = False,
    seed: int = 0,
    amp: bool = False,
    progress: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Meta-test on the classification protocols of :mod:`~monai_metalearn.apps.protocols` (cross-subject,
    cross-modality) for fold ``fold``; writes ``output_dir/metrics.json``.

    Each protocol's patches (its classes, its support and query subjects) are rendered once
    (:func:`~monai_metalearn.data.render_patches`, seeded) and scored by :func:`evaluate_shots` on fixed episodes:
    the same seed gives every learner, and the references, the same episodes. Accuracy is reported over episodes
    (``accuracy``) and over query subjects (``accuracy_subjects``: mean, ci95, n_subjects).

    Returns:
        ``{"protocols": {name: metrics}, "fold": fold, ...}``; ``metrics`` as :func:`evaluate_shots` writes them.
    """
    from monai_metalearn.apps.protocols import ProtocolError, classification_protocols
    from monai_metalearn.data import patch_transforms, render_patches

    try:
        entries = classification_protocols(protocols, patches, folds, fold)
    except ProtocolError as err:
        fail(str(err), ConfigError)
    transform = patch_transforms(spatial_size, body_coordinates=body_coordinates)
    results: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        subjects = set(entry["support_subjects"]) | set(entry["query_subjects"])
        chosen = [p for p in patches if p["class"] in entry["classes"] and str(p["subject"]) in subjects]
        rendered = render_patches(chosen, transform, seed=seed + 2 + i, progress=progress)
        results[entry["name"]] = evaluate_shots(
            learner, rendered, entry["classes"], entry["n_way"], shots, q_query, num_episodes, device, output_dir,
            seed=seed + 100 * i, amp=amp, progress=progress, support_subjects=entry["support_subjects"],
            query_subjects=entry["query_subjects"], metrics_name=f"metrics_{entry['name']}.json",
            support_pool=sorted(entry["support_subjects"]), protocol=entry["name"],
        )
    out = {"protocols": results, "fold": int(fold), "body_coordinates": bool(body_coordinates), **extra}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(out, indent=2))
    return out


#: ``python -m monai.bundle run`` arguments that are not config ids.
_RUN_ARGS = {
    "config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "args_file", "tracking",
    "workflow_type", "workflow_name", "properties_path",
}


def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """One-line error for a ``--key value`` override that names no config entry (a typo such as ``--epoch 3``
    would otherwise be added silently and ignored). Only looks at a ``python -m monai.bundle run`` command line.
    """
    import difflib
    import sys

    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].replace("\\", "/").endswith(("monai/bundle/__main__.py", "monai.bundle")):
        return
    keys, files = [], None
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            keys.append(name)
            if name == "config_file":
                files = value or (argv[i + 1] if i + 1 < len(argv) else None)
    if not files:
        return
    try:
        config = ConfigParser.load_config_files(_config_file_list(files))
    except Exception:  # monai reports unreadable configs itself
        return
    ids: set[str] = set()
    dict_ids: set[str] = set()  # a new key inside a dict entry (``--learner_args#inner_lr 0.1``) is fine

    def walk(node: Any, prefix: str) -> None:
        if prefix:
            ids.add(prefix)
        if isinstance(node, Mapping):
            dict_ids.add(prefix)
            for k, v in node.items():
                walk(v, f"{prefix}#{k}" if prefix else str(k))
        elif isinstance(node, list):
            for j, v in enumerate(node):
                walk(v, f"{prefix}#{j}")

    walk(config, "")
    for key in keys:
        norm = key.replace("::", "#")
        if norm in _RUN_ARGS or norm in ids or ("#" in norm and norm.rpartition("#")[0] in dict_ids):
            continue
        close = difflib.get_close_matches(norm, sorted(i for i in ids if "#" not in i), n=3)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        fail(f"unknown config key --{key} (not in {files}){hint}", ConfigError)


def _config_file_list(files: str) -> list[str]:
    """``"['a.json','b.json']"`` / ``"a.json,b.json"`` / ``"a.json"`` -> list of paths."""
    import ast

    text = str(files).strip()
    if text.startswith("["):
        return [str(f) for f in ast.literal_eval(text)]
    return [f for f in text.split(",") if f]


# ---------------------------------------------------------------------------------------------------- inference
def read_task_file(
    path: str | os.PathLike,
    data_dir: str | None,
    support_files: Sequence[str],
    query_files: Sequence[str],
    expected: str,
) -> dict[str, Any]:
    """The checks every few-shot task file gets: readable JSON with non-empty ``support`` and ``query`` lists of
    dicts holding ``image``, a ``label`` on every support item, and the file entries (``support_files`` /
    ``query_files`` keys present in an item) resolved to existing paths, relative to the task file's folder or
    ``data_dir``. Exits with a one-line error naming the item and file otherwise."""
    path = Path(path)
    if not path.is_file():
        fail(f"task_file {str(path)!r} not found", MissingFileError)
    try:
        task = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        fail(f"task_file {str(path)!r} is not valid JSON: {err}", TaskFileError)
    if not isinstance(task, dict) or not task.get("support"):
        fail(f"task_file {str(path)!r} has no support examples (expected {expected})", TaskFileError)
    if not task.get("query"):
        fail(f"task_file {str(path)!r} has no query images", TaskFileError)
    bases = [path.parent] + ([Path(data_dir)] if data_dir else [])

    def resolve(p: str, where: str) -> str:
        for base in bases:
            cand = Path(p) if Path(p).is_absolute() else base / p
            if cand.exists():
                return str(cand)
        fail(f"{where}: file {p!r} not found (relative to {', '.join(str(b) for b in bases)})", MissingFileError)

    for part, keys in (("support", support_files), ("query", query_files)):
        for i, item in enumerate(task[part]):
            if not isinstance(item, dict) or "image" not in item:
                fail(f"task_file {part}[{i}] has no 'image'", TaskFileError)
            if part == "support" and "label" not in item:
                fail(f"task_file support[{i}] ({item['image']}) has no 'label'", TaskFileError)
            for key in keys:
                if key not in item:
                    continue
                where = f"{part}[{i}]" + ("" if key == "image" else f" {key}")
                if isinstance(item[key], list):  # several images of one case (cardiac phases, MR sequences)
                    if not item[key] or not all(isinstance(p, str) for p in item[key]):
                        fail(f"{where}: {key!r} must be a path or a non-empty list of paths, got {item[key]!r}",
                            TaskFileError)
                    item[key] = [resolve(p, where) for p in item[key]]
                else:
                    item[key] = resolve(item[key], where)
    return task


def load_task_file(path: str | os.PathLike, data_dir: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Reads and checks a few-shot task file.

    Format::

        {"support": [{"image": "a.nii.gz", "label": "lesion"}, ...],
         "query": [{"image": "q.nii.gz"}, ...]}

    ``image`` is a NIfTI/NRRD file or a DICOM series folder, or a list of them: the co-registered images of one
    case (``["ed.nii.gz", "es.nii.gz"]``), read as channels in that order (they must share one grid). An optional
    ``id`` per item is echoed in the predictions. Relative paths are taken from the task file's folder (or
    ``data_dir``). An item may also give ``mask`` (a label map) and ``mask_label`` (its id of the structure,
    default: any non-zero voxel): the image is then cropped around that structure, as in training.

    Exits with a one-line error for: a missing/unreadable file, no support, fewer than 2 classes, a support item
    without ``label``, a missing image.
    """
    task = read_task_file(path, data_dir, support_files=("image", "mask"), query_files=("image", "mask"),
                          expected="{'support': [{'image', 'label'}], 'query': [{'image'}]}")
    labels = sorted({str(it["label"]) for it in task["support"]})
    if len(labels) < 2:
        fail(f"task_file support has {len(labels)} class ({labels}): a few-shot task needs at least 2 classes",
            TaskFileError)
    return task


def inference_transforms(
    spatial_size: Sequence[int] = (32, 32, 32), pixdim: Sequence[float] | None = None, body_coordinates: bool = False
):
    """Loading + patch pipeline for task-file images: checked loading, RAS, optional spacing, crop around the
    ``mask`` structure when given (else the whole image), resize to ``spatial_size``, z-score; with
    ``body_coordinates`` the three body-frame channels of :class:`~monai_metalearn.transforms.BodyCoordinates`
    (the body box of the whole scan, its intensity kind from the item's ``modality`` / ``intensity`` or inferred)."""
    from monai.transforms import Compose

    load, patch = _inference_stages(spatial_size, pixdim, body_coordinates)
    return Compose([load, patch])


class _AddBodyBox:
    """Adds ``body_box`` (world box of the body of the whole scan) to a loaded task item."""

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from monai_metalearn.apps.segmentation import item_intensity
        from monai_metalearn.transforms import body_box, scale_intensity

        d = dict(data)
        image = d["image"]
        d["body_box"] = body_box(scale_intensity(image, item_intensity(d, image)), affine=image.affine)
        return d


def _inference_stages(spatial_size: Sequence[int], pixdim: Sequence[float] | None, body_coordinates: bool = False):
    """The two halves of :func:`inference_transforms`: reading a scan (once per file in a task), and cutting one
    patch out of it (once per task item)."""
    from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, Orientationd, Resized, Spacingd

    from monai_metalearn.data import LoadScand
    from monai_metalearn.transforms import BodyCoordinatesd

    load = [
        LoadScand(keys=["image", "roi"], allow_missing_keys=True),
        Orientationd(keys=["image", "roi"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")),
                     allow_missing_keys=True),
    ]
    if pixdim is not None:
        load.append(Spacingd(keys=["image", "roi"], pixdim=pixdim, mode=["bilinear", "nearest"],
                             allow_missing_keys=True))
    if body_coordinates:
        load.append(_AddBodyBox())
    patch = [
        _MaskCrop(spatial_size),
        Resized(keys="image", spatial_size=tuple(spatial_size)),
        EnsureTyped(keys="image", dtype=torch.float32),
        NormalizeIntensityd(keys="image"),
    ]
    if body_coordinates:
        patch.append(BodyCoordinatesd(keys="image"))
    patch.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(load), Compose(patch)


class _MaskCrop:
    """Crops ``image`` around ``roi`` (voxels equal to ``structure``, or any non-zero voxel) when the item has one.

    Internal keys ``roi`` / ``structure`` hold the task file's ``mask`` / ``mask_label`` (MONAI's spatial dictionary
    transforms treat every key that starts with ``"<key>_"`` as that key's metadata, so ``mask_label`` cannot sit
    next to ``mask``)."""

    def __init__(self, spatial_size: Sequence[int], margin: float = 0.1) -> None:
        self.spatial_size, self.margin = tuple(spatial_size), margin

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from monai_metalearn.transforms import CropStructure

        d = dict(data)
        if d.get("roi") is None:
            return d
        roi = d.pop("roi")
        structure = d.pop("structure", None)
        source = roi.meta.get("filename_or_obj", "") if hasattr(roi, "meta") else ""
        empty = "no non-zero voxel" if structure is None else f"no voxel equal to mask_label {structure}"
        if structure is None:
            roi = (roi > 0).to(torch.uint8)
            structure = 1
        if not bool((torch.as_tensor(roi) == int(structure)).any()):  # predict_task prefixes the task item
            fail(f"mask {source or '<mask>'} is empty: {empty}", DataError)
        try:
            d["image"], _ = CropStructure(structure=int(structure), margin=self.margin)(d["image"], roi)
        except ValueError as err:
            fail(f"mask {source or '<mask>'}: {err}", DataError)
        return d


AddBodyBoxd = _AddBodyBox
"""Public name of the body-box step of the task-image pipeline (``inference.json``'s ``preprocessing``)."""

MaskCropd = _MaskCrop
"""Public name of the crop around a task item's ``mask`` (``inference.json``'s ``preprocessing``)."""


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def predict_task(
    learner: torch.nn.Module,
    task_file: str,
    output_dir: str,
    spatial_size: Sequence[int] = (32, 32, 32),
    pixdim: Sequence[float] | None = (2.0, 2.0, 2.0),
    device: str | torch.device = "cpu",
    data_dir: str | None = None,
    transform: Any = None,
    body_coordinates: bool = False,
    preprocessing: Any = None,
    postprocessing: Any = None,
) -> dict[str, Any]:
    """Adapts ``learner`` to the task file's support set and writes ``output_dir/predictions.json``.

    Args:
        transform: reads one task item ``{"image": path or [paths]}`` into ``{"image": tensor}`` (e.g.
            :func:`monai_metalearn.diagnosis.case_transforms`, the diagnosis pipeline); default the patch pipeline
            (:func:`inference_transforms` with ``spatial_size``, ``pixdim`` and ``body_coordinates``, ``mask`` crops).
        body_coordinates: the learner was trained on patches with body-frame coordinate channels
            (``patch_transforms(body_coordinates=True)``): give the task's patches the same channels.
        preprocessing: the patch pipeline in place of the default one (``inference.json``'s ``preprocessing``):
            a ``Compose`` of two ``Compose`` stages, the first applied once per scan file (reading; sees ``image``,
            ``roi`` = the item's ``mask``, ``modality`` / ``intensity``), the second once per task item (cropping
            around ``roi`` voxels equal to ``structure`` = the item's ``mask_label``, resizing, scaling); any other
            transform is applied to each item whole. Ignored when ``transform`` is given.
        postprocessing: maps the query logits ``[Q, N]`` to class probabilities (e.g. MONAI
            ``Activations(softmax=True, dim=1)``); default the softmax over the task's classes.

    Returns:
        ``{"classes": [...], "predictions": [{"id" (when given), "image", "label", "probabilities": {class: p}}]}``.
    """
    from monai_metalearn.apps.segmentation import _reason
    from monai_metalearn.data import ScanLoadError
    from monai_metalearn.transforms import BodyFrameError

    task = load_task_file(task_file, data_dir)
    if preprocessing is None:
        read, cut = _inference_stages(spatial_size, pixdim, body_coordinates)
    else:
        stages = list(getattr(preprocessing, "transforms", ()))
        if len(stages) == 2 and all(hasattr(t, "transforms") for t in stages):  # (once per scan, once per item)
            read, cut = stages
        else:
            read, cut = dict, preprocessing
    classes = sorted({str(it["label"]) for it in task["support"]})
    scans: dict[tuple[str, str | None], dict[str, Any]] = {}  # a scan used by several items is read once

    def load(items: list[dict[str, Any]], part: str) -> torch.Tensor:
        out = []
        for i, item in enumerate(items):
            try:
                if transform is not None:
                    out.append(transform({"image": item["image"]})["image"])
                    continue
                key = (_hashable(item["image"]), item.get("mask"))
                if key not in scans:
                    entry = {"image": key[0]} if key[1] is None else {"image": key[0], "roi": key[1]}
                    entry.update({k: item[k] for k in ("modality", "intensity") if item.get(k)})
                    scans[key] = read(entry)
                entry = {**scans[key], "name": f"{part}[{i}] {item['image']}"}
                if key[1] is not None:
                    entry["structure"] = item.get("mask_label")
                out.append(cut(entry)["image"])
            except (ScanLoadError, BodyFrameError, RuntimeError, OSError) as err:
                reason = _reason(err)  # the loading error, not MONAI's "applying transform" wrapper
                if reason.startswith("roi: "):  # the task file's "mask", read under an internal key
                    reason = "mask: " + reason[len("roi: "):]
                fail(f"{part}[{i}] {item['image']}: {reason}", DataError)
        return torch.stack([torch.as_tensor(x) for x in out]).to(device)

    sx, qx = load(task["support"], "support"), load(task["query"], "query")
    sy = torch.tensor([classes.index(str(it["label"])) for it in task["support"]], device=device)
    learner = learner.to(device).eval()
    from monai_metalearn.learners import FineTuneBaseline, MatchingNet, ProtoNet

    flexible = isinstance(learner, (ProtoNet, FineTuneBaseline, MatchingNet))  # no fixed head: any number of classes
    saved_n_way = learner.n_way if flexible else None
    try:
        if flexible:
            learner.n_way = len(classes)
        with torch.enable_grad():
            predictor = learner.adapt(sx, sy)
    except ValueError as err:
        fail(f"cannot adapt to the support set of {task_file}: {err} (the task has {len(classes)} classes)",
            TaskFileError)
    finally:
        if flexible:
            learner.n_way = saved_n_way
    with torch.no_grad():
        logits = predictor(qx).float()
    if logits.shape[1] < len(classes):
        fail(f"the task has {len(classes)} classes but the model was trained {logits.shape[1]}-way: use at most "
             f"{logits.shape[1]} labels, or a learner without a fixed head (protonet, matching, finetune)",
                 TaskFileError)
    logits = logits[:, : len(classes)]
    probs = (torch.softmax(logits, dim=1) if postprocessing is None else torch.as_tensor(postprocessing(logits))).cpu()
    preds = [
        {
            **({"id": item["id"]} if "id" in item else {}),
            "image": item["image"],
            "label": classes[int(p.argmax())],
            "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)},
        }
        for item, p in zip(task["query"], probs)
    ]
    result = {"classes": classes, "k_shot": {c: sum(str(it["label"]) == c for it in task["support"]) for c in classes},
              "predictions": preds}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "predictions.json").write_text(json.dumps(result, indent=2))
    return result
