"""A per-process cache of memory-mapped shards, keyed by study uid.

Datasets hold a `ShardStore` instead of arrays. Shards are opened lazily on first use, inside
whichever process reads them (a DataLoader worker after fork or spawn), so nothing opened in
the parent is shared and pickling a dataset never copies a volume. Arrays stay np.memmap
objects: indexing a few slices reads only those pages from disk.

Each open shard keeps one file descriptor per array, so the cache is a small LRU.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from cspine_ray.io.errors import StudyError
from cspine_ray.preprocess.shards import META, Shard, open_shard, study_path


class ShardStore:
    """Opens shards of `shards_dir` on demand and keeps up to `max_open` of them mapped."""

    def __init__(self, shards_dir: str | Path, max_open: int = 64):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.shards_dir = Path(shards_dir)
        self.max_open = max_open
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._open: OrderedDict[str, Shard] = OrderedDict()

    def get(self, uid: str) -> Shard:
        """The study's shard with memory-mapped arrays; raises StudyError if it does not exist."""
        if os.getpid() != self._pid:  # forked worker: reopen here rather than reuse the parent's maps
            self._reset()
        shard = self._open.get(uid)
        if shard is not None:
            self._open.move_to_end(uid)
            return shard
        path = study_path(self.shards_dir, uid)
        if not (path / META).is_file():
            raise StudyError(uid, f"no shard at {path}")
        shard = open_shard(path, mmap=True)
        self._open[uid] = shard
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return shard

    def __len__(self) -> int:
        return len(self._open)

    # pickling (DataLoader workers, Ray) carries only the location, never the maps
    def __getstate__(self) -> dict:
        return {"shards_dir": self.shards_dir, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.shards_dir = state["shards_dir"]
        self.max_open = state["max_open"]
        self._reset()
