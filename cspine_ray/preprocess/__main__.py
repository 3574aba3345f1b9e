import sys

from cspine_ray.cli import step_main

sys.exit(step_main("cspine_ray.preprocess.cli", "DICOM studies -> sharded dataset (Ray Data)"))
