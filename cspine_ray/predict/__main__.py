import sys

from cspine_ray.cli import step_main

sys.exit(step_main("cspine_ray.predict.cli", "predict new studies with a registered ensemble (Ray Data)"))
