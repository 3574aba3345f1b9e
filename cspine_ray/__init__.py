"""cspine-ray: Ray-distributed training and search for cervical-spine fracture detection on CT.

The package follows the data flow, one stage per package or module:

    io -> synth (demo data) -> preprocess -> datasets -> models -> train -> tune -> promote -> predict
    -> serve

`metric` holds the competition metric every stage reports.
"""

__version__ = "0.1.0"

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
N_VERTEBRAE = len(VERTEBRAE)
TARGETS = VERTEBRAE + ("patient_overall",)
