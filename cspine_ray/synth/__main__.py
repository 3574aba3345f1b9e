"""`python -m cspine_ray.synth OUT --studies N`."""

import sys

from cspine_ray.cli import step_main

sys.exit(step_main("cspine_ray.synth.cli", "generate a synthetic RSNA-layout demo dataset"))
