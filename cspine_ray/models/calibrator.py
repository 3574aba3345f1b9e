"""A second-level model: 7 vertebra scores + 7 found flags -> 8 calibrated probabilities.

Why: the competition metric (`cspine_ray.metric`) is a weighted log loss, so a well-ranked
but badly calibrated score loses points, most of all on patient_overall (7x the weight of a
vertebra), which today comes from the fixed top-N rule (`aggregate.patient_overall`). A small
model fitted on out-of-fold predictions recalibrates all eight, costs no retraining and is
chosen on the same out-of-fold table as N. The idea follows the RSNA 2022 winners' second
stages (5th place's "stage 3", 1st place's patient-level model), in its smallest form.

Two L2-regularised logistic regressions, with x_v = logit(clip(score_v)) and f_v = found_v:

    vertebra v:       logit p_v = slope * f_v * x_v + not_found * (1 - f_v) + intercept_v
    patient_overall:  logit p   = patient_weights . features + patient_intercept

One slope for all seven vertebrae keeps the fit stable on a few hundred studies (C1 has ~7%
positives). A vertebra stage 1 did not find carries a placeholder score (today the training
prior), not evidence, so its score is masked out and it gets its own learned log-odds
`not_found + intercept_v`, whatever placeholder the pipeline wrote. The patient features are
in PATIENT_FEATURES.

Both fits minimise the competition metric itself: row (i, t) weighs w_it / sum_t' w_it' (the
metric's 1/2, 7/14 weights, normalised within the study as `per_study_loss` does), so the
data term is n_studies * competition_metric. The penalty l2/2 * |theta - centre|^2 pulls the
slopes to 0 and the intercepts to the log-odds of the weighted prevalence (vertebrae pooled),
so a strong l2 gives the constant prior and a fold without a positive stays finite.
numpy + scipy.special only; the fit is deterministic (Newton's method from the centre).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.special import expit, logit

from cspine_ray import N_VERTEBRAE, TARGETS
from cspine_ray.metric import weights_for

CLIP = 1e-6  # scores are clipped to [CLIP, 1 - CLIP] before logit, outputs likewise
PRIOR_CLIP = (0.01, 0.99)  # the penalty centre's prevalence, clipped as the training prior is
PATIENT_FEATURES = ("logit_max", "logit_top7", "mean_logit", "found_fraction")
_MAX_NEWTON = 100


@dataclass(frozen=True)
class Calibrator:
    """Fitted coefficients, plain floats (json.dumps(dataclasses.asdict(c)) works)."""

    slope: float
    not_found: float
    intercepts: tuple[float, ...]  # C1..C7
    patient_weights: tuple[float, ...]  # in PATIENT_FEATURES order
    patient_intercept: float

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"calibrator needs exactly the keys {sorted(names)}, got {sorted(d)}")
        try:
            c = cls(slope=float(d["slope"]), not_found=float(d["not_found"]),
                    intercepts=tuple(float(v) for v in d["intercepts"]),
                    patient_weights=tuple(float(v) for v in d["patient_weights"]),
                    patient_intercept=float(d["patient_intercept"]))
        except TypeError as e:  # e.g. a number where a list belongs
            raise ValueError(f"calibrator coefficients must be numbers and lists: {e}") from None
        if len(c.intercepts) != N_VERTEBRAE or len(c.patient_weights) != len(PATIENT_FEATURES):
            raise ValueError(f"calibrator needs {N_VERTEBRAE} intercepts and "
                             f"{len(PATIENT_FEATURES)} patient_weights")
        if not np.isfinite(_theta(c)).all():
            raise ValueError("calibrator coefficients must be finite")
        return c

    def predict(self, scores, found) -> np.ndarray:
        """(n, 7) scores, (n, 7) found -> (n, 8) float64 probabilities in TARGETS order."""
        s, f = _check_inputs(scores, found)
        theta = _theta(self)
        z_vert = _vertebra_design(s, f) @ theta[:N_VERTEBRAE + 2]
        z_patient = _patient_design(s, f) @ theta[N_VERTEBRAE + 2:]
        z = np.column_stack([z_vert.reshape(len(s), N_VERTEBRAE), z_patient])
        return np.clip(expit(z), CLIP, 1 - CLIP)


def metric_weights(labels) -> np.ndarray:
    """(n, 8) row weights under which sum(w * bce) = n * competition_metric."""
    w = weights_for(labels)
    return w / w.sum(axis=1, keepdims=True)


def fit_calibrator(scores, found, labels, l2: float = 1.0, weights=None) -> Calibrator:
    """Fit on one out-of-fold table. `weights` (n, 8) defaults to `metric_weights(labels)`."""
    s, f = _check_inputs(scores, found)
    y = _check_labels(labels, len(s))
    w = metric_weights(y) if weights is None else _check_weights(weights, len(s))
    if not (np.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")

    y_vert, w_vert = y[:, :N_VERTEBRAE].ravel(), w[:, :N_VERTEBRAE].ravel()  # row-major: i, v
    centre_vert = np.r_[0.0, 0.0, np.full(N_VERTEBRAE, _prior_logit(y_vert, w_vert))]
    vert = _fit_logistic(_vertebra_design(s, f), y_vert, w_vert, l2, centre_vert)

    centre_patient = np.r_[np.zeros(len(PATIENT_FEATURES)), _prior_logit(y[:, -1], w[:, -1])]
    patient = _fit_logistic(_patient_design(s, f), y[:, -1], w[:, -1], l2, centre_patient)
    return Calibrator(slope=float(vert[0]), not_found=float(vert[1]),
                      intercepts=tuple(map(float, vert[2:])),
                      patient_weights=tuple(map(float, patient[:-1])),
                      patient_intercept=float(patient[-1]))


def cross_fit(scores, found, labels, folds, l2: float = 1.0, weights=None) -> np.ndarray:
    """(n, 8) honest predictions: fold k's rows come from a calibrator fitted on the others."""
    s, f = _check_inputs(scores, found)
    y = _check_labels(labels, len(s))
    w = metric_weights(y) if weights is None else _check_weights(weights, len(s))
    folds = np.asarray(folds)
    if folds.shape != (len(s),):
        raise ValueError(f"folds must have shape ({len(s)},), got {folds.shape}")
    if folds.dtype.kind == "f" and np.isnan(folds).any():
        raise ValueError("folds contain NaN")
    if len(np.unique(folds)) < 2:
        raise ValueError("cross_fit needs at least 2 distinct folds")
    out = np.empty((len(s), len(TARGETS)))
    for k in np.unique(folds):
        held, train = folds == k, folds != k
        model = fit_calibrator(s[train], f[train], y[train], l2=l2, weights=w[train])
        out[held] = model.predict(s[held], f[held])
    return out


# --- features -----------------------------------------------------------------------------

def _vertebra_design(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(n * 7, 9): [found * x, not found, one-hot vertebra], rows ordered study then vertebra."""
    x = logit(np.clip(s, CLIP, 1 - CLIP))
    onehot = np.tile(np.eye(N_VERTEBRAE), (len(s), 1))
    return np.column_stack([(f * x).ravel(), (~f).ravel().astype(float), onehot])


def _patient_design(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(n, 5): PATIENT_FEATURES then a column of ones."""
    s = np.clip(s, CLIP, 1 - CLIP)
    x = logit(s)
    top7 = np.clip(-np.expm1(np.log1p(-s).sum(axis=1)), CLIP, 1 - CLIP)  # 1 - prod(1 - s)
    return np.column_stack([x.max(axis=1), logit(top7), x.mean(axis=1),
                            f.sum(axis=1) / N_VERTEBRAE, np.ones(len(s))])


def _theta(c: Calibrator) -> np.ndarray:
    return np.array([c.slope, c.not_found, *c.intercepts, *c.patient_weights,
                     c.patient_intercept], dtype=np.float64)


# --- the fit ------------------------------------------------------------------------------

def _prior_logit(y: np.ndarray, w: np.ndarray) -> float:
    """Log-odds of the weighted prevalence: the best constant under these weights."""
    return float(logit(np.clip((w * y).sum() / w.sum(), *PRIOR_CLIP)))


def _fit_logistic(X, y, w, l2, centre) -> np.ndarray:
    """argmin sum w * bce(y, sigmoid(X theta)) + l2/2 |theta - centre|^2, by Newton's method
    with backtracking (the objective is convex; a handful of steps from the centre)."""
    def objective(theta):
        z = X @ theta
        return np.sum(w * (np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * np.sum((theta - centre) ** 2)

    theta = centre.astype(np.float64)
    loss = objective(theta)
    for _ in range(_MAX_NEWTON):
        p = expit(X @ theta)
        grad = X.T @ (w * (p - y)) + l2 * (theta - centre)
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + l2 * np.eye(len(theta))
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]  # lstsq: a zero column at l2 = 0
        decrement = grad @ step  # Newton decrement squared: twice the predicted gain
        if decrement <= 1e-12 * (1.0 + abs(loss)):  # converged: one last full step, which
            return theta - step  # the quadratic model makes exact to rounding here
        t = 1.0
        while (new_loss := objective(theta - t * step)) > loss - 0.25 * t * decrement:
            t *= 0.5
            if t < 1e-10:  # no progress left at float precision
                return theta
        theta, loss = theta - t * step, new_loss
    raise RuntimeError(f"calibrator fit did not converge in {_MAX_NEWTON} Newton steps; raise "
                       "l2 (separable data has no finite optimum at l2 = 0)")


# --- validation ---------------------------------------------------------------------------

def _check_inputs(scores, found) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != N_VERTEBRAE or len(s) == 0:
        raise ValueError(f"scores must have shape (n >= 1, {N_VERTEBRAE}), got {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if ((s < 0) | (s > 1)).any():
        raise ValueError("scores must be probabilities in [0, 1]")
    f = np.asarray(found)
    if f.shape != s.shape:
        raise ValueError(f"found has shape {f.shape}, scores {s.shape}")
    if f.dtype != bool:
        if not np.isin(f, (0, 1)).all():  # NaN fails here too
            raise ValueError("found must be booleans (or 0/1)")
        f = f.astype(bool)
    return s, f


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    if y.shape != (n, len(TARGETS)):
        raise ValueError(f"labels must have shape ({n}, {len(TARGETS)}) in TARGETS order, "
                         f"got {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():  # NaN fails here too
        raise ValueError("labels must be 0 or 1")
    return y


def _check_weights(weights, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n, len(TARGETS)):
        raise ValueError(f"weights must have shape ({n}, {len(TARGETS)}), got {w.shape}")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights must be finite and >= 0")
    if w[:, :N_VERTEBRAE].sum() == 0 or w[:, -1].sum() == 0:
        raise ValueError("weights are all 0 on the vertebrae or on patient_overall")
    return w
