"""Preprocessing settings (plain data, loadable from YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from cspine_ray.config import digest, to_dict


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 256                  # in-plane size of every shard slice (z spacing is kept)
    n_folds: int = 5                 # cross-validation folds stored in the manifest
    seed: int = 42                   # fold assignment seed
    min_region_pixels: int = 8       # connected regions smaller than this are mask noise, not vertebrae
    min_bone_hu: float = 150.0       # segmentation alignment check: mean HU inside C1-C7 must exceed this
    chunk_slices: int = 32           # slices resampled together (bounds memory, keeps torch busy)
    memory_per_task_gb: float = 1.5  # what Ray reserves per study task (768x768x600: ~1 GB)

    def __post_init__(self):
        if not 16 <= self.size <= 1024:
            raise ValueError(f"size must be in 16..1024, got {self.size}")
        if not 2 <= self.n_folds <= 20:
            raise ValueError(f"n_folds must be in 2..20, got {self.n_folds}")
        if self.chunk_slices < 1:
            raise ValueError("chunk_slices must be >= 1")

    def shard_hash(self) -> str:
        """Hash of the settings that change shard contents (folds and resources do not)."""
        d = to_dict(self)
        keep = {k: d[k] for k in ("size", "min_region_pixels", "min_bone_hu")}
        return digest(keep)
