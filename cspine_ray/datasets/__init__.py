"""torch Datasets over the preprocessed shards (memory-mapped; only the slices a sample needs are read).

    windowing   HU -> [0, 1] through (centre, width) windows; presets in WINDOWS
    store       ShardStore: per-process, lazily opened, memory-mapped shards by uid
    images      slices of a mapped volume -> windowed, resized tensors
    tables      study labels from the manifest; slice tables (ratio + box) from shards
    slices      SliceDataset: 2.5D slices + per-slice targets (2D families, stage 1)
    sequences   choose_slices, study_crop_box, VertebraSequenceDataset (two-stage stage 2)
    volumes     VolumeDataset: the windowed volume resized to a cube (cnn3d)
    augment     AugmentConfig, augment_batch: vectorised batch augmentation on any device
"""

from cspine_ray.datasets.augment import AugmentConfig, augment_batch
from cspine_ray.datasets.sequences import VertebraSequenceDataset, choose_slices, study_crop_box
from cspine_ray.datasets.slices import SliceDataset, slice_items
from cspine_ray.datasets.store import ShardStore
from cspine_ray.datasets.tables import shard_slice_table, shard_slice_tables, study_labels
from cspine_ray.datasets.volumes import VolumeDataset
from cspine_ray.datasets.windowing import WINDOWS, apply_windows, resolve_windows

__all__ = [
    "WINDOWS", "apply_windows", "resolve_windows", "ShardStore", "study_labels",
    "shard_slice_table", "shard_slice_tables", "SliceDataset", "slice_items", "choose_slices",
    "study_crop_box", "VertebraSequenceDataset", "VolumeDataset", "AugmentConfig", "augment_batch",
]
