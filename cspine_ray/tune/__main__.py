import sys

from cspine_ray.cli import step_main

sys.exit(step_main("cspine_ray.tune.cli", "search model families and hyperparameters (Ray Tune + Optuna + MLflow)"))
