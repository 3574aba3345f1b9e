"""Preprocessing settings (plain data, loadable from YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from cspine_ray.config import digest, to_dict


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 256                  # in-plane size of every shard slice (z spacing is kept)
    # the native-resolution level beside it (native.npy), for stage-2 crops and the 2D families:
    # native_size px (a 512 px study as it is, a 768 px one resized to 512), for every study at
    # least that large; a smaller study has none (its crops come from the `size` volume), so the
    # native crops of a shard set all come from one resolution. 0: no native level
    native_size: int = 512
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
        if self.native_size and not self.size < self.native_size <= 2048:
            raise ValueError(f"native_size must be 0 (no native level) or in {self.size + 1}..2048 "
                             f"(larger than size {self.size}), got {self.native_size}")
        if self.chunk_slices < 1:
            raise ValueError("chunk_slices must be >= 1")

    def shard_hash(self) -> str:
        """Hash of the settings that change shard contents (folds and resources do not)."""
        d = to_dict(self)
        keep = {k: d[k] for k in ("size", "min_region_pixels", "min_bone_hu")}
        if self.native_size:  # absent when off: shards without a native level keep their hash
            keep["native_size"] = self.native_size
        return digest(keep)

    def native_side(self, shape: tuple[int, int]) -> int:
        """In-plane size of a study's native level: native_size when the study is at least
        that large, else 0 (none)."""
        return self.native_size if self.native_size and max(shape) >= self.native_size else 0
