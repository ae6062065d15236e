"""The evaluation protocols of the project, in one place: the bundles, the benchmarks and the tutorials use these.

Segmentation (1-way K-shot, Dice per 3D query scan, support and query from different subjects):

* ``abdominal``: the SSL-ALPNet / Q-Net evaluation in 3D. Test organs :data:`ABDOMINAL_TEST_ORGANS` (liver,
  spleen, kidneys), three settings of support -> query: BTCV CT -> BTCV CT (``abdominal_ct``), CHAOS MR -> CHAOS MR
  (``abdominal_mr``) and BTCV CT -> CHAOS MR (``abdominal_ct_to_mr``). Learned methods are meta-trained on the other
  BTCV organs (:data:`BTCV_TRAIN_ORGANS`) of the training subjects of a fold; the BTCV subjects are split into folds
  (:func:`subject_folds`, listed in the bundle config) and a fold's test subjects are never its training subjects.
  CHAOS is never trained on. *Setting 2* (the default) marks the test organs' voxels of every training scan as
  ignored (:data:`~monai_metalearn.transforms.IGNORE_LABEL`: no loss, no background patch, no background
  prototype); *setting 1* leaves them in the training scans as unlabelled background.
* ``heart``: ACDC end-diastolic frames, right ventricle, myocardium, left ventricle; support and query patients
  differ. No ACDC scan is trained on.
* ``brain``: LPBA40, test structures :data:`LPBA40_TEST_STRUCTURES` (deep grey matter) disjoint from the training
  structures (the gyri, cerebellum, brainstem: :func:`lpba40_train_structures`); folds over the 6 subjects as for
  BTCV.

Each protocol entry is a dict ``{"name", "structures", "support_subjects", "query_subjects", "num_episodes"}`` as
:func:`~monai_metalearn.apps.segmentation.evaluate_segmentation` takes it; balanced episodes take every (structure,
query subject) pair ``episodes_per_query`` times, each with supports drawn from the support pool.

Classification (N-way K-shot structure patches, test classes disjoint from training classes, support and query from
different subjects; :data:`CLASSIFICATION_PROTOCOLS`, :func:`classification_protocols`):

* ``btcv_cross_subject``: 5-way over :data:`BTCV_CLASSIFICATION_TEST` (the abdominal four and the gallbladder) in the
  fold's BTCV test subjects;
* ``lpba40_cross_subject``: 5-way over :data:`LPBA40_TEST_STRUCTURES` in the fold's LPBA40 test subjects;
* ``acdc_cross_subject``: the three ACDC structures across all 30 patients (3-way: ACDC has three);
* ``ct_to_mr``: BTCV CT support (the fold's test subjects), CHAOS MR query, liver / spleen / kidneys (4-way: CHAOS
  has four organs).

Meta-training (:func:`classification_training_subjects`) uses the other classes (:data:`CLASSIFICATION_TRAIN_CLASSES`)
of the training-fold subjects of BTCV and LPBA40 only; CHAOS and ACDC are never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai_metalearn.errors import ConfigError

__all__ = [
    "ABDOMINAL_TEST_ORGANS",
    "BTCV_TRAIN_ORGANS",
    "HEART_STRUCTURES",
    "LPBA40_TEST_STRUCTURES",
    "SEGMENTATION_PROTOCOLS",
    "ProtocolError",
    "lpba40_train_structures",
    "subject_folds",
    "check_folds",
    "fold_split",
    "ignored_structures",
    "segmentation_protocols",
    "BTCV_CLASSIFICATION_TEST",
    "CLASSIFICATION_PROTOCOLS",
    "CLASSIFICATION_TRAIN_CLASSES",
    "classification_protocols",
    "classification_training_subjects",
]

#: Test organs of the abdominal protocol (SSL-ALPNet's four).
ABDOMINAL_TEST_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")
#: The other BTCV organs: the abdominal protocol's meta-training structures.
BTCV_TRAIN_ORGANS = (
    "gallbladder", "esophagus", "stomach", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left",
)
#: ACDC's three structures: the heart protocol's test structures.
HEART_STRUCTURES = ("right_ventricle", "myocardium", "left_ventricle")
#: LPBA40 deep grey matter: the brain protocol's test structures.
LPBA40_TEST_STRUCTURES = ("caudate_left", "caudate_right", "putamen_left", "putamen_right", "hippocampus_left",
                          "hippocampus_right")
#: Protocol names :func:`segmentation_protocols` knows, and the entries each one evaluates.
SEGMENTATION_PROTOCOLS = {
    "abdominal": ("abdominal_ct", "abdominal_mr", "abdominal_ct_to_mr"),
    "heart": ("heart",),
    "brain": ("brain",),
}

#: BTCV organs of the classification protocols (5-way: the abdominal four and the gallbladder).
BTCV_CLASSIFICATION_TEST = ABDOMINAL_TEST_ORGANS + ("gallbladder",)
#: Classification protocol name -> support source, query source, test classes, N of the N-way episodes.
CLASSIFICATION_PROTOCOLS: dict[str, dict[str, Any]] = {
    "btcv_cross_subject": {"support_source": "btcv_sabs", "query_source": "btcv_sabs",
                           "classes": BTCV_CLASSIFICATION_TEST, "n_way": 5},
    "lpba40_cross_subject": {"support_source": "lpba40", "query_source": "lpba40",
                             "classes": LPBA40_TEST_STRUCTURES, "n_way": 5},
    "acdc_cross_subject": {"support_source": "acdc", "query_source": "acdc", "classes": HEART_STRUCTURES, "n_way": 3},
    "ct_to_mr": {"support_source": "btcv_sabs", "query_source": "chaos_t2", "classes": ABDOMINAL_TEST_ORGANS,
                 "n_way": 4},
}


def _classification_train_classes() -> dict[str, list[str]]:
    from monai_metalearn.data.names import BTCV_NAMES, LPBA40_NAMES

    tested = {c for p in CLASSIFICATION_PROTOCOLS.values() for c in p["classes"]}
    return {
        "btcv_sabs": [n for _, n in sorted(BTCV_NAMES.items()) if n not in tested],
        "lpba40": [n for _, n in sorted(LPBA40_NAMES.items()) if n not in tested],
    }


#: The meta-training classes of the classification protocols per training source: every other BTCV organ and LPBA40
#: structure (none is a test class of any protocol).
CLASSIFICATION_TRAIN_CLASSES: dict[str, list[str]] = _classification_train_classes()


class ProtocolError(ConfigError):
    """A protocol, fold list or split that cannot be evaluated as asked (names what is wrong)."""


def lpba40_train_structures() -> list[str]:
    """The LPBA40 structures that are not brain-protocol test structures (gyri, insula, cingulate, cerebellum,
    brainstem), in label-id order."""
    from monai_metalearn.data.names import LPBA40_NAMES

    return [n for _, n in sorted(LPBA40_NAMES.items()) if n not in LPBA40_TEST_STRUCTURES]


def subject_folds(subjects: Sequence[str], n_folds: int) -> list[list[str]]:
    """Split subjects into ``n_folds`` test folds, round robin over the sorted ids (fold ``f`` holds the ``f``-th,
    ``f + n``-th, ... subject): deterministic, balanced, and independent of any result.

    Raises:
        ProtocolError: for fewer subjects than folds, fewer than 2 folds, or repeated subject ids.
    """
    ids = sorted(str(s) for s in subjects)
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"repeated subject ids in {ids}")
    if n_folds < 2 or n_folds > len(ids):
        raise ProtocolError(f"need 2 <= n_folds <= {len(ids)} subjects, got n_folds={n_folds}")
    return [ids[f::n_folds] for f in range(n_folds)]


def check_folds(folds: Mapping[str, Sequence[Sequence[str]]], known: Sequence[str] | None = None) -> dict:
    """Checks cross-validation folds ``{source: [[test subjects of fold 0], [fold 1], ...]}``: within a source the
    folds are disjoint, every source has the same number of folds, and (with ``known``) every subject exists.

    Returns:
        the folds as lists of strings.

    Raises:
        ProtocolError: naming the source and the subject that is in two folds, unknown, or the fold counts.
    """
    out: dict[str, list[list[str]]] = {}
    counts = {src: len(fs) for src, fs in folds.items()}
    if len(set(counts.values())) > 1:
        raise ProtocolError(f"every source needs the same number of folds, got {counts}")
    known_set = None if known is None else {str(k) for k in known}
    for src, fs in folds.items():
        seen: dict[str, int] = {}
        for f, subjects in enumerate(fs):
            for sub in subjects:
                sub = str(sub)
                if sub in seen:
                    raise ProtocolError(f"folds of {src!r}: subject {sub!r} is in fold {seen[sub]} and fold {f}")
                if known_set is not None and sub not in known_set:
                    raise ProtocolError(f"folds of {src!r}: subject {sub!r} is not a subject of the data")
                seen[sub] = f
        out[str(src)] = [[str(s) for s in subjects] for subjects in fs]
    return out


def fold_split(
    folds: Mapping[str, Sequence[Sequence[str]]], fold: int, subjects: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Training and test subjects of fold ``fold``.

    Args:
        folds: ``{source: [[test subjects of fold 0], ...]}`` (see :func:`check_folds`).
        fold: the fold index.
        subjects: ``{source: all its subjects}`` of the training sources (a source without folds trains on all its
            subjects and is tested on none).

    Returns:
        ``{"train": [...], "test": [...]}``; the two never share a subject.

    Raises:
        ProtocolError: for a fold index out of range.
    """
    folds = check_folds(folds)
    n = min((len(fs) for fs in folds.values()), default=0)
    if not 0 <= int(fold) < max(n, 1) or n == 0:
        raise ProtocolError(f"fold {fold} is out of range: the config lists {n} fold(s)")
    test: list[str] = []
    train: list[str] = []
    for src, subs in subjects.items():
        held = set(folds[src][int(fold)]) if src in folds else set()
        test += [str(s) for s in subs if str(s) in held]
        train += [str(s) for s in subs if str(s) not in held]
    return {"train": train, "test": test}


def ignored_structures(setting: int, test_structures: Sequence[str]) -> list[str]:
    """The structures whose voxels training episodes ignore: the test structures in setting 2, none in setting 1.

    Raises:
        ProtocolError: for a setting other than 1 or 2.
    """
    if int(setting) not in (1, 2):
        raise ProtocolError(f"setting must be 1 (test organs unlabelled in training scans) or 2 (their voxels "
                            f"ignored), got {setting!r}")
    return list(test_structures) if int(setting) == 2 else []


def _by_source(subjects: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in subjects:
        out.setdefault(str(item.get("source")), []).append(str(item["subject"]))
    return {k: sorted(set(v)) for k, v in out.items()}


def segmentation_protocols(
    protocol: str | Sequence[str],
    subjects: Sequence[Mapping[str, Any]],
    folds: Mapping[str, Sequence[Sequence[str]]],
    fold: int,
    episodes_per_query: int = 1,
    k_shot: int = 1,
) -> list[dict[str, Any]]:
    """The protocol entries of ``protocol`` (``"abdominal"``, ``"heart"``, ``"brain"``, ``"all"`` or a list) for
    fold ``fold``, over the loaded ``subjects`` (items with ``subject`` and ``source``).

    Pools: ``abdominal_ct`` support and query from the fold's BTCV test subjects; ``abdominal_mr`` all CHAOS
    subjects; ``abdominal_ct_to_mr`` support from the fold's BTCV test subjects, query CHAOS; ``heart`` all ACDC
    patients; ``brain`` the fold's LPBA40 test subjects. ``num_episodes`` is ``structures x query subjects x
    episodes_per_query``.

    Raises:
        ProtocolError: unknown protocol name, a protocol whose source is not among ``subjects``, or too few
            subjects for ``k_shot`` support and one query.
    """
    names = list(SEGMENTATION_PROTOCOLS) if protocol == "all" else (
        [protocol] if isinstance(protocol, str) else list(protocol))
    unknown = [n for n in names if n not in SEGMENTATION_PROTOCOLS]
    if unknown:
        raise ProtocolError(f"unknown protocol {unknown}; choose from {sorted(SEGMENTATION_PROTOCOLS)} or 'all'")
    have = _by_source(subjects)
    folds = check_folds(folds, [s for subs in have.values() for s in subs])

    def test_of(source: str) -> list[str]:
        if source not in have:
            raise ProtocolError(f"the protocol needs source {source!r}, which is not among the loaded subjects "
                                f"(sources: {sorted(have)})")
        if source not in folds:
            return have[source]
        if not 0 <= int(fold) < len(folds[source]):
            raise ProtocolError(f"fold {fold} is out of range: {source!r} has {len(folds[source])} folds")
        return [s for s in have[source] if s in set(folds[source][int(fold)])]

    table = {
        "abdominal_ct": (ABDOMINAL_TEST_ORGANS, lambda: test_of("btcv_sabs"), lambda: test_of("btcv_sabs")),
        "abdominal_mr": (ABDOMINAL_TEST_ORGANS, lambda: test_of("chaos_t2"), lambda: test_of("chaos_t2")),
        "abdominal_ct_to_mr": (ABDOMINAL_TEST_ORGANS, lambda: test_of("btcv_sabs"), lambda: test_of("chaos_t2")),
        "heart": (HEART_STRUCTURES, lambda: test_of("acdc"), lambda: test_of("acdc")),
        "brain": (LPBA40_TEST_STRUCTURES, lambda: test_of("lpba40"), lambda: test_of("lpba40")),
    }
    out = []
    for name in names:
        for entry in SEGMENTATION_PROTOCOLS[name]:
            structures, support, query = table[entry]
            sup, qry = support(), query()
            if len(set(sup) | set(qry)) < k_shot + 1 or len(sup) < k_shot:
                raise ProtocolError(f"protocol {entry!r} fold {fold}: {len(sup)} support and {len(qry)} query "
                                    f"subjects cannot give {k_shot}-shot episodes with a different query subject")
            out.append({"name": entry, "structures": list(structures), "support_subjects": sup,
                        "query_subjects": qry, "num_episodes": len(structures) * len(qry) * int(episodes_per_query)})
    return out


def classification_training_subjects(
    subjects: Sequence[Mapping[str, Any]], folds: Mapping[str, Sequence[Sequence[str]]], fold: int
) -> list[str]:
    """The subjects whose training classes meta-train fold ``fold``: the sources with folds (BTCV, LPBA40), minus the
    fold's test subjects. Sources without folds (CHAOS, ACDC) are test-only and give none.

    Args:
        subjects: items (patches or datalist items) with ``subject`` and ``source``.
        folds: ``{source: [[test subjects of fold 0], ...]}``.
        fold: the fold index.

    Raises:
        ProtocolError: fold out of range, or a folded source with no subject among ``subjects``.
    """
    have = _by_source(subjects)
    folds = check_folds(folds, [s for subs in have.values() for s in subs])
    missing = [src for src in folds if src not in have]
    if missing:
        raise ProtocolError(f"the folds list source(s) {missing}, which have no subject among the loaded items "
                            f"(sources: {sorted(have)})")
    return sorted(fold_split(folds, fold, {src: have[src] for src in folds})["train"])


def classification_protocols(
    protocol: str | Sequence[str],
    subjects: Sequence[Mapping[str, Any]],
    folds: Mapping[str, Sequence[Sequence[str]]],
    fold: int,
) -> list[dict[str, Any]]:
    """The classification protocol entries of ``protocol`` (a name of :data:`CLASSIFICATION_PROTOCOLS`, ``"all"`` or
    a list) for fold ``fold``: ``{"name", "classes", "n_way", "support_subjects", "query_subjects"}``.

    A source with folds contributes the fold's test subjects; a source without folds (CHAOS, ACDC: never trained on)
    all its subjects. Support and query are always different subjects (cross-subject episodes).

    Raises:
        ProtocolError: unknown protocol, a source not among ``subjects``, fold out of range.
    """
    names = list(CLASSIFICATION_PROTOCOLS) if protocol == "all" else (
        [protocol] if isinstance(protocol, str) else list(protocol))
    unknown = [n for n in names if n not in CLASSIFICATION_PROTOCOLS]
    if unknown:
        raise ProtocolError(f"unknown classification protocol {unknown}; choose from "
                            f"{sorted(CLASSIFICATION_PROTOCOLS)} or 'all'")
    have = _by_source(subjects)
    folds = check_folds(folds, [s for subs in have.values() for s in subs])

    def pool(source: str, name: str) -> list[str]:
        if source not in have:
            raise ProtocolError(f"classification protocol {name!r} needs source {source!r}, which is not among the "
                                f"loaded subjects (sources: {sorted(have)})")
        if source not in folds:
            return have[source]
        if not 0 <= int(fold) < len(folds[source]):
            raise ProtocolError(f"fold {fold} is out of range: {source!r} has {len(folds[source])} folds")
        return [s for s in have[source] if s in set(folds[source][int(fold)])]

    out = []
    for name in names:
        spec = CLASSIFICATION_PROTOCOLS[name]
        out.append({"name": name, "classes": list(spec["classes"]), "n_way": int(spec["n_way"]),
                    "support_subjects": pool(spec["support_source"], name),
                    "query_subjects": pool(spec["query_source"], name)})
    return out

