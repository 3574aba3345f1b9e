"""Training on Ray Train: one worker per fold, each fold its own model (no DDP between folds).

    config   TrainConfig and its sections (plain data, from YAML)
    losses   the metric-weighted losses
    tasks/   one task per family (+ the stage-1 locator): model, batches, loss, predictions
    loop     the worker loop: folds, epochs, CV exchange, checkpoints
    job      the driver: TorchTrainer, stage-1 and result reuse, export
    cli      `python -m cspine_ray.train`
"""
