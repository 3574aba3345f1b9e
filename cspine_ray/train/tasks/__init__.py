"""One task per family (plus the stage-1 locator): how it trains and predicts one fold."""

from __future__ import annotations

from cspine_ray.train.config import TrainConfig
from cspine_ray.train.tasks.base import JobData, Task
from cspine_ray.train.tasks.cnn3d import Cnn3dTask
from cspine_ray.train.tasks.locator import LocatorTask
from cspine_ray.train.tasks.multi_head import MultiHeadTask
from cspine_ray.train.tasks.single_head import SingleHeadTask
from cspine_ray.train.tasks.two_stage import TwoStageTask

TASKS: dict[str, type[Task]] = {
    "locator": LocatorTask,
    "cnn3d": Cnn3dTask,
    "single_head": SingleHeadTask,
    "multi_head": MultiHeadTask,
    "two_stage": TwoStageTask,
}


def make_task(name: str, cfg: TrainConfig, data: JobData) -> Task:
    return TASKS[name](cfg, data)
