"""Reading what users bring: DICOM series, RSNA segmentations and the RSNA folder layout.

    dicom         a study folder -> canonical HU volume (head -> feet), spacing, warnings
    jpeg2000      half-resolution reads: the 5/3 low-pass band, decoded from JPEG 2000 or computed
    segmentation  RSNA NIfTI -> labels aligned to that volume, with an HU sanity check
    rsna          the RSNA layout: studies, labels, boxes; every problem reported by study
    errors        StudyError, the one error for unusable input

`rsna` is imported from its own module (`cspine_ray.io.rsna`), not re-exported here.
"""

from cspine_ray.io.dicom import SeriesInfo, iter_hu_slices, read_series, scan_series
from cspine_ray.io.errors import StudyError
from cspine_ray.io.segmentation import AlignedSegmentation, load_segmentation

__all__ = [
    "AlignedSegmentation",
    "SeriesInfo",
    "StudyError",
    "iter_hu_slices",
    "load_segmentation",
    "read_series",
    "scan_series",
]
