"""Inference: the promoted fold ensemble on new studies.

    ensemble  a training result (+ its stage 1) as one predictor, fold models averaged
    inputs    finding study folders; sharding a new study as training did
    pyfunc    the MLflow pyfunc wrapper and its artifact bundle (what `promote` registers)
    cli       `python -m cspine_ray.predict`: Ray Data batch inference with model replicas
"""
