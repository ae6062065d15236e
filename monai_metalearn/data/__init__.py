"""Real sources as MONAI datalists, checked loading, and episodic few-shot tasks over any MONAI dataset."""

from monai_metalearn.data.episodes import (
    ClassificationEpisodeDataset,
    EpochIndexSampler,
    SegmentationEpisodeDataset,
    can_draw_episode,
    episode_collate,
    episode_loader,
)
from monai_metalearn.data.loading import (
    LoadScan,
    LoadScand,
    LoadScanD,
    LoadScanDict,
    ScanLoadError,
    correct_orientation,
    validate_datalist,
)
from monai_metalearn.data.names import (
    ACDC_NAMES,
    BTCV_NAMES,
    CHAOS_NAMES,
    FREESURFER_NAMES,
    LPBA40_NAMES,
    STRUCTURE_NAMES,
    TOTALSEG_NAMES,
    canonical_name,
)
from monai_metalearn.data.patches import (
    build_structure_patches,
    class_counts,
    patch_transforms,
    render_patches,
    scan_reader,
)
from monai_metalearn.data.readers import NpzReader
from monai_metalearn.data.sampler import Episode, EpisodeSampler, check_disjoint_splits, split_classes
from monai_metalearn.data.sources import (
    SOURCES,
    Source,
    UpstreamLayout,
    data_dir,
    get_source,
    load_datalist,
    file_orientation,
    registration_settings,
)
from monai_metalearn.data.upstream import LabelIdError

__all__ = [
    "ACDC_NAMES",
    "BTCV_NAMES",
    "CHAOS_NAMES",
    "ClassificationEpisodeDataset",
    "Episode",
    "EpisodeSampler",
    "EpochIndexSampler",
    "FREESURFER_NAMES",
    "LPBA40_NAMES",
    "LabelIdError",
    "LoadScan",
    "LoadScanD",
    "LoadScanDict",
    "LoadScand",
    "correct_orientation",
    "NpzReader",
    "SOURCES",
    "STRUCTURE_NAMES",
    "ScanLoadError",
    "SegmentationEpisodeDataset",
    "can_draw_episode",
    "Source",
    "TOTALSEG_NAMES",
    "UpstreamLayout",
    "build_structure_patches",
    "canonical_name",
    "check_disjoint_splits",
    "registration_settings",
    "file_orientation",
    "class_counts",
    "data_dir",
    "episode_collate",
    "episode_loader",
    "get_source",
    "load_datalist",
    "patch_transforms",
    "render_patches",
    "scan_reader",
    "split_classes",
    "validate_datalist",
]
