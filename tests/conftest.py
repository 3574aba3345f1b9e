"""Shared fixtures: a local Ray (2 CPUs), a tiny generated dataset and its shards.

Integration tests run the real pipeline (synth -> preprocess -> train -> tune -> promote ->
predict) on a few small studies; they share one Ray session and one preprocessed dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # a developer's own store never takes the tests' runs
os.environ.pop("MLFLOW_REGISTRY_URI", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_CT = SHARED / "data" / "real_ct"

# the tiny dataset every integration test shares: 16 train + 2 test studies, 64 px, 3 mm
TINY = dict(studies=16, test_studies=2, seed=7, size=64, slice_spacing=3.0, severity="obvious")

# training settings that finish in seconds per epoch on 2 CPUs (tiny timm backbones)
TINY_TRAIN = {
    "backbone": "test_efficientnet",
    "optim": {"epochs": 2, "batch_size": 16, "lr": 0.003, "t0": 2},
    "input": {"image_size": 32, "slices_per_study": 6, "eval_stride": 4, "cube": 24,
              "loader_workers": 0},
    "stage1": {"backbone": "test_efficientnet", "image_size": 48, "epochs": 6, "batch_size": 32,
               "slices_per_study": 24, "lr": 0.003},
    "sequence": {"length": 2, "crop_size": 32, "hidden": 16, "layers": 1},
    "model": {},
    "resources": {"num_workers": 2},
}


@pytest.fixture(scope="session", autouse=True)
def scratch_working_folder(tmp_path_factory):
    """Every test runs from a scratch folder: what a command leaves in the folder it runs from
    (tune's runs/last-search.json) stays out of the checkout and of the next session."""
    cwd = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("workdir"))
    yield
    os.chdir(cwd)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (dashboard on, as Tune needs it)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=True,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_specs():
    from cspine_ray.synth import dataset_specs

    return dataset_specs(TINY["studies"], seed=TINY["seed"], n_test=TINY["test_studies"],
                         size=TINY["size"], slice_spacing=TINY["slice_spacing"],
                         severity=TINY["severity"])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_specs) -> Path:
    from cspine_ray.synth import write_dataset

    root = tmp_path_factory.mktemp("data") / "rsna"
    write_dataset(root, tiny_specs)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_dataset, ray_local) -> Path:
    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess

    out = tmp_path_factory.mktemp("shards") / "shards"
    # the 1.5x studies (96 px) get a native level: training, prediction and serving read one
    run_preprocess(tiny_dataset, out, PreprocessConfig(size=64, native_size=96, n_folds=2))
    return out


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> Path:
    """One run storage for the session: a result trained by one module (same settings, same
    shards, same key) is reused by the next, as a user's second job would."""
    return tmp_path_factory.mktemp("runs")
