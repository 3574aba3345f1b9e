import sys

from cspine_ray.cli import step_main

sys.exit(step_main("cspine_ray.serve.cli", "serve the champion over HTTP (Ray Serve)"))
