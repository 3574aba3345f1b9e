import sys

from cspine_ray.cli import step_main

sys.exit(step_main("cspine_ray.train.cli", "fold-parallel training on Ray Train"))
