"""The promoted ensemble as an `mlflow.pyfunc` model: fold models + stage 1 + preprocessing.

A bundle folder (logged as the model's artifact) holds:

    result/   result.json, config.yaml, fold_<k>.pt   (the family's fold models)
    stage1/   the same for the stage-1 locator (families that have one)
    preprocess.json                                   (the shard settings training used)
    model.json                        (family, top_n or calibrator, cv_metric, run id)

`predict(DataFrame)` takes one row per study: `archive` (the bytes of a zip or tar of its DICOM
files, or their base64 as JSON carries them: what `mlflow models serve` is sent) or `study_dir`
(a folder on the serving machine, read only under the roots that CSPINE_ALLOWED_ROOTS names,
separated by the path separator: a client must not make the server read any folder it likes),
and an optional `study_uid`. Each study is sharded exactly as training did; the answer is
C1..C7 + patient_overall per study. A study that cannot be read, an archive refused by the
endpoint's rules (`serve/archive.py`) or a path outside the allowed roots gets the training
prior and its reason in the `reason` column, never an exception.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from cspine_ray import TARGETS
from cspine_ray.preprocess.shards import study_path

KEEP = ("result.json", "config.yaml")
PREPROCESS = "preprocess.json"
ALLOWED_ROOTS_ENV = "CSPINE_ALLOWED_ROOTS"


class InputRefused(ValueError):
    """A row the model will not read (the reason is answered in its `reason` column)."""


def allowed_roots() -> tuple[str, ...]:
    """The folders a `study_dir` may lie under: CSPINE_ALLOWED_ROOTS of the serving environment
    (none when unset: only archives are read)."""
    return tuple(r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if r)


def study_folder(row: dict, work: Path) -> Path:
    """The folder of one input row's study: its archive unpacked under `work` by the endpoint's
    rules, or its `study_dir` when that lies under an allowed root; else InputRefused."""
    from cspine_ray.io.rsna import resolves_inside
    from cspine_ray.serve.archive import ArchiveError, extract_study

    archive = row.get("archive")
    if archive is not None and not (isinstance(archive, float) and archive != archive):  # NaN
        if isinstance(archive, str):  # base64, as JSON carries binary columns
            try:
                archive = base64.b64decode(archive, validate=True)
            except (binascii.Error, ValueError):
                raise InputRefused("the archive is neither bytes nor base64") from None
        try:
            return extract_study(bytes(archive), work)
        except ArchiveError as e:
            raise InputRefused(str(e)) from None
    folder = row.get("study_dir")
    if not isinstance(folder, str) or not folder:
        raise InputRefused("the row has neither an archive nor a study_dir")
    roots = allowed_roots()
    if not any(resolves_inside(folder, r) for r in roots):
        raise InputRefused(f"the folder is not under a root this model may read (set "
                           f"{ALLOWED_ROOTS_ENV} where it is served)")
    return Path(folder)


def make_bundle(result_dir: str | Path, stage1_dir: str | Path | None, shards_dir: str | Path,
                out: Path, info: dict) -> Path:
    """Copy what inference needs (no training-set predictions) into `out`."""
    for name, source in (("result", result_dir), ("stage1", stage1_dir)):
        if not source:
            continue
        target = out / name
        target.mkdir(parents=True)
        for f in Path(source).iterdir():
            if f.name in KEEP or (f.name.startswith("fold_") and f.suffix == ".pt"):
                shutil.copy2(f, target / f.name)
    shutil.copy2(Path(shards_dir) / PREPROCESS, out / PREPROCESS)
    (out / "model.json").write_text(json.dumps(info, indent=1))
    return out


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """MLflow wrapper around `cspine_ray.predict.ensemble.Ensemble`."""

    def load_context(self, context):
        from cspine_ray.models.calibrator import Calibrator
        from cspine_ray.predict.ensemble import Ensemble
        from cspine_ray.predict.inputs import load_preprocess_config

        bundle = Path(context.artifacts["bundle"])
        self.info = json.loads((bundle / "model.json").read_text())
        stage1 = bundle / "stage1"
        calibrator = self.info.get("calibrator")
        self.ensemble = Ensemble.load(bundle / "result", stage1 if stage1.exists() else None,
                                      top_n=self.info.get("top_n"),
                                      calibrator=Calibrator.from_dict(calibrator) if calibrator else None)
        self.preprocess = load_preprocess_config(bundle / PREPROCESS)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from cspine_ray.predict.inputs import shard_study

        rows = []
        with tempfile.TemporaryDirectory(prefix="cspine-predict-") as work:
            for i, r in enumerate(model_input.to_dict("records")):
                uid = r.get("study_uid")
                if not isinstance(uid, str) or not uid:  # never an archive member's name
                    uid = Path(r["study_dir"]).name if isinstance(r.get("study_dir"), str) else f"study-{i}"
                try:
                    folder = study_folder(r, Path(work) / f"upload-{i}")
                except InputRefused as e:
                    rows.append({"study_uid": uid, "status": "failed", "reason": str(e),
                                 "warnings": ""})
                    continue
                rows.append(shard_study({"study_uid": uid, "study_dir": str(folder), "index": i},
                                        self.preprocess, work))
            return predict_sharded(self.ensemble, work, rows)


def bundle_preprocess(model_path: str | Path):
    """The preprocessing settings of a local EnsembleModel folder, read without loading its models."""
    from mlflow.models import Model

    from cspine_ray.predict.inputs import load_preprocess_config

    artifact = Model.load(str(model_path)).flavors["python_function"]["artifacts"]["bundle"]["path"]
    return load_preprocess_config(Path(model_path) / artifact / PREPROCESS)


def predict_sharded(ensemble, work_dir: str, rows: list[dict],
                    report_dir: str | None = None) -> pd.DataFrame:
    """Probabilities for sharded rows (from `shard_study`); failed ones get the prior.

    With `report_dir`, each readable study also gets a PNG: its sagittal view with the
    predicted level of every vertebra and the eight probabilities.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    probs = pd.DataFrame(columns=list(TARGETS), dtype=float)
    tables: dict = {}
    if ok:
        probs, tables = ensemble.predict(work_dir, [r["shard"] for r in ok])
    out = []
    for r in rows:
        values = probs.loc[r["shard"]] if r["status"] == "ok" else ensemble.prior_row()
        out.append({"study_uid": r["study_uid"], **{t: float(values[t]) for t in TARGETS},
                    "status": r["status"], "reason": r["reason"], "warnings": r.get("warnings", "")})
        if report_dir and r["status"] == "ok":
            write_report(study_path(work_dir, r["shard"]), r["study_uid"],
                         values.to_numpy(dtype=float), tables.get(r["shard"]), Path(report_dir))
    return pd.DataFrame(out)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip(".") or "study"


def write_report(shard_dir: Path, study: str, probs, table, report_dir: Path) -> Path:
    from cspine_ray.figures import sagittal_figure, save
    from cspine_ray.preprocess.shards import open_shard

    report_dir.mkdir(parents=True, exist_ok=True)
    shard = open_shard(shard_dir)
    path = report_dir / f"{safe_name(study)}.png"
    save(sagittal_figure(shard.volume, shard.spacing, probs, table,
                         title=f"{study}: patient_overall {probs[-1]:.2f}"), path)
    return path
