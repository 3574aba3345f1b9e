"""Synthetic neck-CT studies in the RSNA 2022 layout, for demos and tests.

    specs = dataset_specs(40, seed=0)          # labels, storage variants, splits
    write_dataset("demo", specs)               # DICOM + NIfTI + CSVs
    truth = synth_study(specs[0])              # regenerate any study's HU, labels, boxes

Modules: shapes (signed-distance painter), phantom (anatomy), fractures (fractures and
look-alikes), study (spec -> volumes), dicom_writer, dataset (layout), preview, cli.
"""

from cspine_ray.synth.dataset import dataset_specs, missing_test_uid, write_dataset, write_study, write_tables
from cspine_ray.synth.study import FractureBox, StudySpec, SynthStudy, synth_study

__all__ = ["FractureBox", "StudySpec", "SynthStudy", "dataset_specs", "missing_test_uid", "synth_study",
           "write_dataset", "write_study", "write_tables"]
