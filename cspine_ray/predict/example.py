"""A tiny generated study: the registered model's input example and each serving replica's
health probe.

Drawn by the demo generator (no patient in it) at 32 px and 5 mm slices: a zip of about 100 KB,
small enough to ship in a model's metadata, and a real study for every step of prediction
(reading DICOM, sharding, both stages), so a model that predicts it is a model that works.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

EXAMPLE = {"seed": 9001, "size": 32, "slice_spacing": 5.0}  # a seed no other data set uses


def write_example_study(root: Path) -> Path:
    """The example study's DICOM series written under `root`; returns its folder."""
    from cspine_ray.synth import dataset_specs, write_study

    spec = dataset_specs(1, seed=EXAMPLE["seed"], n_test=0, size=EXAMPLE["size"],
                         slice_spacing=EXAMPLE["slice_spacing"], segmented_fraction=0.0)[0]
    write_study(spec, root)
    return root / f"{spec.split}_images" / spec.uid


def example_archive() -> bytes:
    """The example study as the zip a client uploads."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="cspine-example-") as work:
        study = write_example_study(Path(work))
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in sorted(study.iterdir()):
                archive.write(f, f.name)
    return buffer.getvalue()
