"""The data a search runs on: given shards, an RSNA root preprocessed on the fly, or the demo set.

Everything lands under the search's storage and is reused: the demo dataset is generated once
per settings (a complete marker is written last), and preprocessing resumes from finished
shards, so a second search over unchanged data costs a quick check of each study.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cspine_ray.config import digest, to_dict
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.tune.space import DemoData

log = logging.getLogger(__name__)

COMPLETE = ".complete"


def demo_dataset(storage: Path, demo: DemoData) -> Path:
    """Generate (once) the synthetic RSNA-layout dataset the demo searches on."""
    from cspine_ray.synth import dataset_specs, write_dataset

    root = storage / "demo" / f"data-{digest(to_dict(demo), 12)}"
    if (root / COMPLETE).exists():
        log.info("demo dataset: reusing %s", root)
        return root
    if root.exists():
        shutil.rmtree(root)  # an interrupted generation
    log.info("demo dataset: generating %d studies at %d px into %s", demo.studies, demo.size, root)
    specs = dataset_specs(demo.studies, seed=demo.seed, n_test=demo.test_studies, size=demo.size,
                          slice_spacing=demo.slice_spacing, severity=demo.severity)
    write_dataset(root, specs)
    (root / COMPLETE).write_text(json.dumps(to_dict(demo)))
    return root


def prepared_shards(data: Path, storage: Path, cfg: PreprocessConfig,
                    address: str | None = None) -> Path:
    """Preprocess `data` into shards under `storage` (resuming; unchanged studies are reused)."""
    from cspine_ray.preprocess.pipeline import run_preprocess

    key = digest([str(data.resolve()), cfg.shard_hash(), cfg.n_folds, cfg.seed], 12)
    out = storage / "shards" / f"{data.resolve().name}-{key}"
    run_preprocess(data, out, cfg, address=address)
    return out


def demo_preprocess_config(demo: DemoData) -> PreprocessConfig:
    return PreprocessConfig(size=demo.shard_size, n_folds=demo.folds, seed=demo.seed)
