"""Preprocessing: RSNA-layout DICOM studies -> one shard per study + a Parquet manifest (Ray Data).

Modules, in the order a study flows through them:
    config    PreprocessConfig (size, folds, seed, ...)
    study     one study -> shard or recorded failure (runs in a Ray task)
    resample  in-plane resampling of HU slices and label volumes
    targets   per-slice stage-1 targets (vertebra ratios, C1-C7 boxes) and fracture boxes
    shards    the shard folder format, atomic commit, reuse checks, `open_shard`
    folds     deterministic stratified fold assignment
    manifest  the manifest's columns, atomic write, `read_manifest`, `manifest_hash`
    pipeline  the whole run (`run_preprocess`), resumable
"""
