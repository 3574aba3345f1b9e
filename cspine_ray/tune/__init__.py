"""Hyperparameter search: Ray Tune + Optuna over fold-parallel training jobs, tracked in MLflow.

    space     search-space YAML -> SearchSpace -> Optuna define-by-run function
    data      demo dataset and on-the-fly preprocessing, reused between searches
    trial     one trial: TrainConfig, stage 1, training (or reuse), the final report
    tracking  MLflow: a parent run per search, a run per trial, figures and predictions
    search    the Tuner (TPE sampler, ASHA, concurrency from the cluster), resume
    cli       `python -m cspine_ray.tune`
"""
