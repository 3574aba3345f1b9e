"""2.5D slice samples: a slice and its neighbours as channels, with per-slice targets.

The 2D families (`single_head`, `multi_head`) and stage 1 of `two_stage` train on these.
Channels are window-major: with windows (w0, w1) and slices (z-k, z, z+k) the image is
[w0(z-k), w0(z), w0(z+k), w1(z-k), w1(z), w1(z+k)], so the first three channels are always
the default window's 2.5D image. Neighbours beyond the volume ends repeat the end slice.

Targets per slice: `ratio` (7) and `box` (4) for stage 1 (from the shard's segmentation or a
given slice table), with `vertebra_boxes` each vertebra's own box (7, 4) too, `visible` = ratio >
threshold, and `fracture` = visible x study label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cspine_ray import N_VERTEBRAE, TARGETS
from cspine_ray.datasets.images import read_windowed
from cspine_ray.datasets.store import ShardStore
from cspine_ray.datasets.tables import check_slice_table, split_table
from cspine_ray.datasets.windowing import resolve_windows
from cspine_ray.io.errors import StudyError
from cspine_ray.preprocess.targets import vertebra_boxes as per_vertebra_boxes


def slice_items(shards_dir: str | Path, uids: Sequence[str], stride: int = 1,
                per_study: int | None = None, rng: np.random.Generator | int | None = None,
                segmented_only: bool = False) -> list[tuple[str, int]]:
    """(uid, z) for every `stride`-th slice of each study, optionally `per_study` of them at random.

    per_study draws without replacement (sorted) from the strided slices with `rng` (a
    Generator, a seed, or None for fresh entropy): a new draw per epoch makes cheap epochs
    that still cover every slice over time. segmented_only skips studies without ratio/box
    targets (stage 1 trains on the segmented studies only).
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if per_study is not None and per_study < 1:
        raise ValueError(f"per_study must be at least 1, got {per_study}")
    rng = np.random.default_rng(rng)
    store = ShardStore(shards_dir, max_open=1)
    items = []
    for uid in uids:
        shard = store.get(uid)
        if segmented_only and shard.ratio is None:
            continue
        zs = np.arange(0, shard.volume.shape[0], stride)
        if per_study is not None and per_study < len(zs):
            zs = np.sort(rng.choice(zs, size=per_study, replace=False))
        items.extend((uid, int(z)) for z in zs)
    return items


class SliceDataset(Dataset):
    """(uid, z) items -> dict of one 2.5D slice and its targets.

    Sample keys:
        image       float32 (3 * n_windows, image_size, image_size), values in [0, 1]
        ratio       float32 (7)  C1..C7 pixel count / study maximum (zeros when unknown)
        box         float32 (4)  C1-C7 box x0, y0, x1, y1 in [0, 1] (zeros when unknown)
        box_valid   bool         box known and the slice shows a vertebra (any ratio > threshold):
                                 where the box loss applies
        vertebra_box float32 (7, 4) each vertebra's own box } only with vertebra_boxes; zeros
        vertebra_box_valid bool (7) known and shown     } where unknown; valid where the box
                                                        } is known and ratio > threshold
        has_targets bool         ratio/box come from a segmentation or the slice table
        visible     float32 (7)  ratio > visibility_threshold
        fracture    float32 (7)  visible x the study's C1..C7 labels   } only when labels
        label       float32 (8)  the study's labels in TARGETS order    } are given
        study       int          index into `self.uids`
        uid         str
        z           int
    labels: uid -> (8) array in TARGETS order; slice_table: uid -> (z, 11) ratio + box, or
    (z, 39) with the vertebrae's boxes (e.g. stage-1 predictions), used instead of the shard's
    targets for the uids it has; the shard's vertebra boxes come from its mask.
    native: read the shards' native-resolution level where they have one (the 2D families);
    stage 1 reads the shard-size volume.
    """

    def __init__(self, shards_dir: str | Path, items: Sequence[tuple[str, int]],
                 labels: Mapping[str, np.ndarray] | None = None, image_size: int = 384,
                 neighbour_offset: int = 1, windows: Sequence[str | Sequence[float]] = ("bone",),
                 slice_table: Mapping[str, np.ndarray] | None = None,
                 visibility_threshold: float = 0.5, native: bool = False,
                 vertebra_boxes: bool = False, max_open: int = 64):
        if neighbour_offset < 0:
            raise ValueError(f"neighbour_offset must be >= 0, got {neighbour_offset}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.store = ShardStore(shards_dir, max_open=max_open)
        self.windows = resolve_windows(windows)
        self.image_size = image_size
        self.neighbour_offset = neighbour_offset
        self.visibility_threshold = visibility_threshold
        self.native = native
        self.vertebra_boxes = vertebra_boxes
        # compact arrays rather than a list of tuples: cheap to pickle into every worker
        self.uids: list[str] = list(dict.fromkeys(uid for uid, _ in items))
        index = {uid: i for i, uid in enumerate(self.uids)}
        self.study = np.array([index[uid] for uid, _ in items], dtype=np.int32)
        self.z = np.array([z for _, z in items], dtype=np.int32)
        self.labels = None
        if labels is not None:
            missing = [uid for uid in self.uids if uid not in labels]
            if missing:
                raise StudyError(missing[0], "no labels for this study")
            self.labels = np.array([labels[u] for u in self.uids], np.float32).reshape(-1, len(TARGETS))
        self.slice_table = {u: np.asarray(slice_table[u], np.float32)
                            for u in self.uids if slice_table is not None and u in slice_table}

    @property
    def channels(self) -> int:
        return 3 * len(self.windows)

    def __len__(self) -> int:
        return len(self.z)

    def _targets(self, uid: str, shard, z: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """ratio (7), C1-C7 box (4), the vertebrae's boxes (7, 4; NaN where unknown), known."""
        own = np.full((N_VERTEBRAE, 4), np.nan, np.float32)
        if uid in self.slice_table:
            table = check_slice_table(uid, self.slice_table[uid], shard.volume.shape[0])[z : z + 1]
            ratio, box, table_own = split_table(table)
            return ratio[0], box[0], own if table_own is None else table_own[0], True
        if shard.ratio is not None and shard.box is not None:
            if self.vertebra_boxes and shard.mask is not None:
                own = per_vertebra_boxes(np.asarray(shard.mask[z : z + 1]))[0]
            return (np.asarray(shard.ratio[z], np.float32), np.asarray(shard.box[z], np.float32),
                    own, True)
        return np.zeros(N_VERTEBRAE, np.float32), np.full(4, np.nan, np.float32), own, False

    def __getitem__(self, i: int) -> dict:
        s, z = int(self.study[i]), int(self.z[i])
        uid = self.uids[s]
        shard = self.store.get(uid)
        n = shard.volume.shape[0]
        if not 0 <= z < n:
            raise StudyError(uid, f"slice {z} out of range (the study has {n})")
        k = self.neighbour_offset
        neighbours = np.clip([z - k, z, z + k], 0, n - 1)
        image = read_windowed(shard.slices(self.native), neighbours, self.windows, self.image_size)
        image = image.reshape(self.channels, self.image_size, self.image_size)

        ratio, box, own, has_targets = self._targets(uid, shard, z)
        visible = (ratio > self.visibility_threshold).astype(np.float32)
        box_valid = bool(np.isfinite(box).all() and visible.any())
        sample = {
            "image": image,
            "ratio": torch.from_numpy(np.nan_to_num(ratio, nan=0.0)),
            "box": torch.from_numpy(np.nan_to_num(box, nan=0.0)),  # NaN would poison a masked loss
            "box_valid": box_valid,
            "has_targets": has_targets,
            "visible": torch.from_numpy(visible),
            **self._vertebra_box_targets(own, visible),
            "study": s,
            "uid": uid,
            "z": z,
        }
        if self.labels is not None:
            label = self.labels[s]
            sample["fracture"] = torch.from_numpy(visible * label[:N_VERTEBRAE])
            sample["label"] = torch.from_numpy(label.copy())
        return sample

    def _vertebra_box_targets(self, own: np.ndarray, visible: np.ndarray) -> dict:
        if not self.vertebra_boxes:
            return {}
        valid = np.isfinite(own).all(1) & (visible > 0)
        return {"vertebra_box": torch.from_numpy(np.nan_to_num(own, nan=0.0)),
                "vertebra_box_valid": torch.from_numpy(valid)}
