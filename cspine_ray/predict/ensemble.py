"""A finished training result as one predictor: its fold models averaged, stage 1 included.

    ensemble = Ensemble.load(result_dir)            # stage-1 folder found from the result
    targets, tables = ensemble.predict(shards_dir, uids)

Study probabilities are the mean of the fold models' (as the thesis averages its 5 folds; a
seed ensemble's members are averaged with them);
patient_overall follows the result's top-N rule (or the one given), or a calibrator fitted on
the out-of-fold predictions gives all eight (models/calibrator.py). The two-stage and 2D
families first run the stage-1 fold models (their slice tables averaged) on the same shards.
Each stage is one pass over the data: every batch of slices (or of vertebra crops), spanning
studies, is read once and run through all fold models (`Task.predict` takes the model list).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cspine_ray import N_VERTEBRAE, TARGETS, VERTEBRAE
from cspine_ray.models import create_model
from cspine_ray.models.calibrator import Calibrator
from cspine_ray.train.result import TrainResult, found_flags, load_result
from cspine_ray.train.tasks import make_task
from cspine_ray.train.tasks.base import Studies, to_targets

log = logging.getLogger(__name__)


def load_fold_models(result: TrainResult, device: torch.device) -> list[nn.Module]:
    """Every fold's best-epoch model (every member's, for a seed ensemble), built from the
    stored spec (never downloading weights)."""
    spec = result.info.model
    models = []
    for fold, member in itertools.product(range(result.n_folds), range(result.n_members)):
        kwargs = dict(spec.kwargs)
        if "pretrained" in kwargs:
            kwargs["pretrained"] = False  # the fold weights replace them anyway
        if "weights" in kwargs:
            kwargs["weights"] = None      # nor may a promoted model need the pretrained file
        model = create_model(spec.name, **kwargs)
        model.load_state_dict(result.fold_weights(fold, member))
        models.append(model.to(device).eval())
    return models


@dataclass
class Ensemble:
    result: TrainResult
    models: list[nn.Module]
    stage1: TrainResult | None
    stage1_models: list[nn.Module]
    top_n: int | None
    device: torch.device
    calibrator: Calibrator | None = None  # replaces the top-N rule when set

    @classmethod
    def load(cls, result_dir: str | Path, stage1_dir: str | Path | None = None,
             top_n: int | None = None, device: str | torch.device | None = None,
             calibrator: Calibrator | None = None) -> Ensemble:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        result = load_result(result_dir)
        stage1 = None
        if result.config.needs_stage1:
            stage1 = load_result(stage1_dir or result.info.stage1_dir)
        return cls(
            result=result, models=load_fold_models(result, device), stage1=stage1,
            stage1_models=load_fold_models(stage1, device) if stage1 else [],
            top_n=top_n if top_n is not None else result.config.effective_top_n, device=device,
            calibrator=calibrator,
        )

    @property
    def prior(self) -> np.ndarray:
        """Training prevalence of each target: the answer for a study that cannot be read."""
        return np.asarray(self.result.info.prior, dtype=np.float64)

    @torch.no_grad()
    def slice_tables(self, shards_dir: str | Path, uids: list[str]) -> dict[str, np.ndarray]:
        """Stage-1 ratio + box per slice, averaged over the stage-1 fold models (one pass)."""
        if not self.stage1_models:
            return {}
        task = make_task("locator", self.stage1.config, Studies(str(shards_dir)))
        return task.predict_tables(self.stage1_models, uids, self.device)

    @torch.no_grad()
    def predict(self, shards_dir: str | Path, uids: list[str]) -> tuple[pd.DataFrame, dict]:
        """(index study_uid x TARGETS probabilities, stage-1 slice tables) for sharded studies."""
        uids = list(uids)
        tables = self.slice_tables(shards_dir, uids)
        task = make_task(self.result.family, self.result.config, Studies(str(shards_dir), tables))
        kwargs = {"prior": self.prior} if self.result.family == "two_stage" else {}
        mean = task.predict(self.models, uids, self.device, **kwargs).loc[uids]
        if self.calibrator is None:
            return to_targets(mean, self.top_n), tables
        probs = self.calibrator.predict(mean[list(VERTEBRAE)].to_numpy(np.float64),
                                        found_flags(self.result, uids, tables))
        return pd.DataFrame(probs, index=uids, columns=list(TARGETS)), tables

    @torch.no_grad()
    def probe(self, shards_dir: str | Path, uid: str) -> None:
        """Run every model on one sharded study, as a serving replica's health check does:
        `predict` (the path requests take) must give eight probabilities, stage 1's table must be
        finite, and the two-stage family's stage 2 judges all seven vertebrae on a table where
        each takes a seventh of the slices, whatever stage 1 found (a study it finds nothing in
        would otherwise be answered with the prior alone). Raises RuntimeError, saying what."""
        probs, tables = self.predict(shards_dir, [uid])
        probabilities = {"the probabilities": probs.loc[uid, list(TARGETS)].to_numpy(np.float64)}
        if self.result.family == "two_stage":
            banded = {uid: seventh_bands(len(tables[uid]), tables[uid].shape[1])}
            task = make_task("two_stage", self.result.config, Studies(str(shards_dir), banded))
            probabilities["stage 2"] = task.predict(self.models, [uid], self.device,
                                                    prior=np.full(len(TARGETS), np.nan)).to_numpy()
        for what, values in {**probabilities, "stage 1's slice table": tables.get(uid, [])}.items():
            values = np.asarray(values, np.float64)
            in_range = what not in probabilities or ((values >= 0) & (values <= 1)).all()
            if not (np.isfinite(values).all() and in_range):
                raise RuntimeError(f"the models answer the probe study with non-probabilities in "
                                   f"{what}: {values.ravel()[:8].tolist()}")

    def found(self, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per study of `tables` (predict's stage-1 tables), which vertebrae stage 1 saw: the
        found flags of stage 2's slice choice (7 bools)."""
        uids = list(tables)
        return dict(zip(uids, found_flags(self.result, uids, tables))) if uids else {}

    def prior_row(self) -> pd.Series:
        return pd.Series(self.prior, index=list(TARGETS))


def seventh_bands(n_slices: int, width: int) -> np.ndarray:
    """A (n_slices, width) slice table in which C1..C7 each fill a seventh of the slices (ratio
    1), every box the middle half of the image: a table on which stage 2 judges each vertebra."""
    table = np.zeros((n_slices, width), np.float32)
    table[:, N_VERTEBRAE:] = np.tile([0.25, 0.25, 0.75, 0.75], (width - N_VERTEBRAE) // 4)
    for v, band in enumerate(np.array_split(np.arange(n_slices), N_VERTEBRAE)):
        table[band, v] = 1.0
    return table
