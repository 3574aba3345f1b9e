"""The preprocessing run: RSNA layout -> Ray Data (one task per study) -> shards + manifest.

Re-running on the same output folder resumes: finished shards and recorded failures whose
sources and settings are unchanged are reused (a cheap check inside each task), everything else
is (re)built. The manifest is written last, atomically, so it always describes complete shards.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pandas as pd

from cspine_ray import TARGETS
from cspine_ray.config import to_dict
from cspine_ray.io.jpeg2000 import JPEG2000_SYNTAXES
from cspine_ray.io.rsna import Layout, discover, resolves_inside
from cspine_ray.preprocess import shards
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.folds import assign_folds, fold_summary
from cspine_ray.preprocess.manifest import StudyRow, manifest_hash, read_manifest, write_manifest
from cspine_ray.preprocess.resample import halvings
from cspine_ray.preprocess.study import StudyItem, process_study

log = logging.getLogger(__name__)

SETTINGS = "preprocess.json"


def study_items(layout: Layout) -> list[StudyItem]:
    """One work item per usable study."""
    return [
        StudyItem(study_uid=s.uid, split=s.split, image_dir=str(s.image_dir),
                  data_root=str(layout.root),  # symlinked slice files must lead inside it
                  segmentation=str(s.segmentation) if s.segmentation else None,
                  fracture_boxes=tuple(tuple(b) for b in s.fracture_boxes))
        for s in layout.studies
    ]


# whole-study CPU cost per pixel relative to uncompressed data (benchmarks/preprocess.py)
_SYNTAX_COST = {"1.2.840.10008.1.2.4.90": 9.0, "1.2.840.10008.1.2.4.91": 9.0,  # JPEG 2000
                "1.2.840.10008.1.2.4.57": 3.0, "1.2.840.10008.1.2.4.70": 3.0,  # JPEG lossless
                "1.2.840.10008.1.2.4.50": 2.0, "1.2.840.10008.1.2.5": 1.3}     # JPEG baseline, RLE
_REDUCED_JPEG2000_COST = 5.5  # JPEG 2000 decoded at half resolution (io/jpeg2000.py)
_SEGMENTATION_COST = 1.2      # reading, aligning and resampling the labels


def estimated_cost(item: StudyItem, size: int) -> float:
    """Rough CPU cost of a study (slices x pixels x decoder cost) from one header; 0 if unreadable."""
    import pydicom

    try:
        root = item.data_root or item.image_dir
        files = [e.path for e in os.scandir(item.image_dir)
                 if e.is_file() and resolves_inside(e.path, root)]  # the reader's symlink policy
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        shape = (int(ds.Rows), int(ds.Columns))
    except Exception:  # the task itself reports unreadable studies
        return 0.0
    per_pixel = _SYNTAX_COST.get(syntax, 1.0)
    if syntax in JPEG2000_SYNTAXES and halvings(shape, size):
        per_pixel = _REDUCED_JPEG2000_COST
    if item.segmentation:
        per_pixel += _SEGMENTATION_COST
    return len(files) * shape[0] * shape[1] * per_pixel


def estimated_costs(items: list[StudyItem], size: int) -> list[float]:
    """estimated_cost of each item, read in Ray tasks: the header of a study is a file from
    outside, so it is parsed on a worker, never in the driver (on a cluster the driver runs on
    the head, which holds the autoscaler's AWS rights)."""
    import ray

    task = ray.remote(num_cpus=1)(_chunk_costs)
    chunks = [items[i:i + _COST_CHUNK] for i in range(0, len(items), _COST_CHUNK)]
    return [c for costs in ray.get([task.remote(chunk, size) for chunk in chunks]) for c in costs]


_COST_CHUNK = 64  # headers per task: one task costs about as much as 20 header reads


def _chunk_costs(chunk: list[StudyItem], size: int) -> list[float]:
    return [estimated_cost(item, size) for item in chunk]


def check_settings(out: Path, cfg: PreprocessConfig, source: Path) -> None:
    """Refuse to mix shards of different settings in one folder; record the settings used."""
    path = out / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("shard_hash") != cfg.shard_hash():
            raise ValueError(
                f"{out} holds shards built with other settings ({old.get('config')}); "
                f"use another --out for {to_dict(cfg)}"
            )
    shards.write_json_atomic(
        path, {"config": to_dict(cfg), "shard_hash": cfg.shard_hash(), "shard_format": shards.SHARD_FORMAT,
               "source": str(source)}
    )


def process_study_row(row: dict, cfg: PreprocessConfig, out_dir: str, verify: bool) -> dict:
    """Ray Data's side of process_study: a row holding a pickled StudyItem in (Arrow has no
    column type for it), a flat StudyRow out."""
    return process_study(pickle.loads(row["item"]), cfg, out_dir, verify).to_dict()


def _run_tasks(items: list[StudyItem], cfg: PreprocessConfig, out: Path, verify: bool) -> list[dict]:
    import ray

    if not items:
        return []
    # One map operator fed by an input buffer: Ray Data's per-operator reservation would hold
    # back half of a small cluster's CPUs for the buffer, so share all of them instead.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    costs = estimated_costs(items, cfg.size)
    # longest first: no lone straggler at the end
    items = [item for _, item in sorted(zip(costs, items), key=lambda pair: -pair[0])]
    rows = [{"study_uid": item.study_uid, "item": pickle.dumps(item)} for item in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(items))
    ds = ds.map(
        process_study_row,
        fn_kwargs={"cfg": cfg, "out_dir": str(out), "verify": verify},
        num_cpus=1,
        memory=int(cfg.memory_per_task_gb * 2**30),
    )
    return list(ds.iter_rows())


def _split_of(reasons: list[str]) -> str:
    """The layout check names the part a problem comes from (test.csv, test_images/...)."""
    return "test" if any("test.csv" in r or "test_images" in r for r in reasons) else "train"


def _layout_failures(layout: Layout) -> tuple[list[dict], dict[str, list[str]]]:
    """Rows for studies the layout check excluded (reason: the problems); notes for studies that
    go on regardless (warnings naming the study, like the reader's)."""
    usable = {s.uid for s in layout.studies}
    excluded: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    for p in layout.problems:
        if p.study in usable:
            notes.setdefault(p.study, []).append(str(p))
        else:
            excluded.setdefault(p.study, []).append(p.problem)
    rows = [StudyRow.failed(uid, _split_of(reasons), "; ".join(reasons)).to_dict()
            for uid, reasons in excluded.items()]
    return rows, notes


def build_manifest(rows: list[dict], layout: Layout, notes: dict[str, list[str]],
                   cfg: PreprocessConfig) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    labels = {s.uid: s.labels for s in layout.studies if s.labels}
    for t in TARGETS:
        df[t] = [int(labels[u][t]) if u in labels else -1 for u in df["study_uid"]]
    df["warnings"] = [
        "; ".join([w] + notes.get(u, []) if w else notes.get(u, []))
        for u, w in zip(df["study_uid"], df["warnings"])
    ]
    df["fold"] = -1
    train_ok = (df["status"] == "ok") & (df["split"] == "train") & (df["patient_overall"] >= 0)
    df.loc[train_ok, "fold"] = assign_folds(df[train_ok], cfg.n_folds, cfg.seed)
    return df


def run_preprocess(data: str | Path, out: str | Path, cfg: PreprocessConfig | None = None,
                   address: str | None = None, num_cpus: int | None = None,
                   verify: bool = False, dashboard: bool = True) -> pd.DataFrame:
    """Preprocess every study under the RSNA layout `data` into `out`; returns the manifest."""
    from cspine_ray.runtime import init_ray

    cfg = cfg or PreprocessConfig()
    data, out = Path(data), Path(out)
    layout = discover(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / shards.STUDIES).mkdir(exist_ok=True)
    check_settings(out, cfg, data)
    stale = shards.remove_stale_tmp(out / shards.STUDIES)
    if stale:
        log.info("removed %d half-written shard(s) left by an interrupted run", stale)

    items = study_items(layout)
    log.info("preprocessing %d studies from %s into %s (%d excluded by the layout check)",
             len(items), data, out, len({p.study for p in layout.problems} - {i.study_uid for i in items}))
    init_ray(address=address, num_cpus=num_cpus, dashboard=dashboard)
    rows = _run_tasks(items, cfg, out, verify)
    failed_rows, notes = _layout_failures(layout)
    manifest = build_manifest(rows + failed_rows, layout, notes, cfg)
    reused = int(sum(bool(r["reused"]) for r in rows))
    write_manifest(manifest, out)
    manifest = read_manifest(out)  # exactly what later steps will read (sorted, typed)

    ok = manifest["status"] == "ok"
    log.info("done: %d ok (%d reused from an earlier run), %d failed; manifest hash %s",
             ok.sum(), reused, (~ok).sum(), manifest_hash(manifest))
    for _, r in manifest[~ok].iterrows():
        log.warning("failed: study %s: %s", r["study_uid"], r["reason"])
    if (manifest["fold"] >= 0).any():
        log.info("folds:\n%s", fold_summary(manifest).to_string())
    return manifest
