"""What `predict` is given, and turning each new study into a shard the same way training did.

Input forms: an RSNA-layout root (its test_images/), a folder of study folders, or one study
folder (a folder holding .dcm files). Study folders become work items named by the folder; a
study that cannot be read is reported with its reason and answered with the training prior.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cspine_ray.io.errors import StudyError
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.shards import SAME_PIXELS_SINCE, SHARD_FORMAT, study_path
from cspine_ray.preprocess.study import StudyItem, build_shard, source_fingerprint

log = logging.getLogger(__name__)


def _is_one_study(folder: Path) -> bool:
    """Files and no subfolders: one study's slices (named .dcm or not, as the reader allows)."""
    with os.scandir(folder) as entries:
        visible = [e for e in entries if not e.name.startswith(".")]
    return any(e.is_file() for e in visible) and not any(e.is_dir() for e in visible)


def discover_studies(root: str | Path) -> list[dict]:
    """[{"study_uid", "study_dir"}] for every study folder under `root`, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if (root / "test_images").is_dir():
        root = root / "test_images"
    if _is_one_study(root):
        folders = [root]
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{root} holds no study folders (nor the files of one study)")
    return [{"study_uid": f.name, "study_dir": str(f.resolve())} for f in folders]


def shard_study(item: dict, cfg: PreprocessConfig, work_dir: str) -> dict:
    """Shard one new study into work_dir/studies/<index>; never raises for bad input."""
    # shards are named by position ("0.<index>", a plain dotted number), never by the
    # user-given folder name
    final = study_path(work_dir, f"0.{int(item['index'])}")
    final.parent.mkdir(parents=True, exist_ok=True)
    row = {**item, "shard": final.name, "status": "ok", "reason": "", "warnings": ""}
    try:
        if final.exists():
            shutil.rmtree(final)
        work = StudyItem(study_uid=item["study_uid"], split="test", image_dir=item["study_dir"])
        meta = build_shard(work, cfg, final, source_fingerprint(work))
        row["warnings"] = "; ".join(meta["warnings"])
    except StudyError as e:
        row.update(status="failed", reason=e.problem)
    except Exception as e:  # an unreadable study must not stop the batch
        log.exception("study %s: unexpected error", item["study_uid"])
        row.update(status="failed", reason=f"unexpected {type(e).__name__}: {e}")
    if row["status"] == "failed":
        log.warning("study %s: %s (answered with the training prior)", item["study_uid"], row["reason"])
    return row


def load_preprocess_config(path: str | Path) -> PreprocessConfig:
    """The shard settings a model was trained with; warns when this version shards differently."""
    from cspine_ray.config import from_dict

    settings = json.loads(Path(path).read_text())
    trained = settings.get("shard_format", 2)  # files without it predate format 3
    if trained < SAME_PIXELS_SINCE:  # formats since then shard new studies to the same pixels
        log.warning("the model was trained on shards of format %s, this version writes format %s "
                    "(see SHARD_FORMAT in cspine_ray/preprocess/shards.py): new studies are resampled "
                    "slightly differently; retrain on re-made shards for exact agreement", trained, SHARD_FORMAT)
    config = dict(settings["config"])
    config.setdefault("native_size", 0)  # settings from before the native level: none
    return from_dict(PreprocessConfig, config)
