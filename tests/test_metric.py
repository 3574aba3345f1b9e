"""The competition metric, AUCs, submission files and the `score` CLI, against hand-computed values."""

import argparse
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cspine_ray import TARGETS
from cspine_ray import cli
from cspine_ray.metric import (
    WEIGHTS, add_arguments, competition_metric, evaluate, global_metric, per_study_loss,
    prior_predictions, read_labels, read_submission, roc_auc, run, weights_for, write_submission,
)

LN2 = math.log(2)
UIDS = ["1.2.826.0.1.3680043.10001", "1.2.826.0.1.3680043.10002", "1.2.826.0.1.3680043.10003"]


def row(positives=(), patient=None):
    """One study's labels in TARGETS order; patient_overall defaults to any(positives)."""
    y = np.zeros(8)
    for v in positives:
        y[TARGETS.index(v)] = 1
    y[7] = bool(positives) if patient is None else patient
    return y


# --- weights and the metric ----------------------------------------------------------------

def test_weights_follow_design():
    assert WEIGHTS["C4"] == (1.0, 2.0) and WEIGHTS["patient_overall"] == (7.0, 14.0)
    w = weights_for(np.stack([row(), row(["C2"])]))
    assert w[0].tolist() == [1, 1, 1, 1, 1, 1, 1, 7]
    assert w[1].tolist() == [1, 2, 1, 1, 1, 1, 1, 14]


def test_one_half_everywhere_scores_ln2():
    y = np.stack([row(), row(["C1", "C7"]), row(["C3"])])
    p = np.full_like(y, 0.5)
    assert competition_metric(y, p) == pytest.approx(LN2, rel=1e-14)
    assert global_metric(y, p) == pytest.approx(LN2, rel=1e-14)
    assert per_study_loss(y, p) == pytest.approx([LN2] * 3, rel=1e-14)


def test_hand_computed_single_study():
    # One study: C2 fractured (so patient_overall = 1), every other vertebra intact.
    # p: C2 = 0.8, patient_overall = 0.6, the six other vertebrae 0.1 each.
    #   C2:       w = 2,  bce = -ln 0.8 = 0.2231435513
    #   patient:  w = 14, bce = -ln 0.6 = 0.5108256238
    #   others:   w = 1 each (x6), bce = -ln(1 - 0.1) = 0.1053605157
    #   sum(w*bce) = 2*0.2231435513 + 14*0.5108256238 + 6*0.1053605157
    #              = 0.4462871026 + 7.1515587328 + 0.6321630939 = 8.2300089293
    #   sum(w)     = 2 + 14 + 6 = 22  ->  loss = 8.2300089293 / 22 = 0.3740913150
    y = row(["C2"])[None]
    p = np.full((1, 8), 0.1)
    p[0, TARGETS.index("C2")] = 0.8
    p[0, 7] = 0.6
    assert competition_metric(y, p) == pytest.approx(0.3740913150, abs=1e-9)
    assert global_metric(y, p) == pytest.approx(0.3740913150, abs=1e-9)


def test_per_study_and_global_differ():
    # Study A: all negative, p = 0.1 everywhere: loss = -ln 0.9 = 0.1053605157, sum(w) = 7 + 7 = 14.
    # Study B: C1 and patient positive, p = 0.5 everywhere: loss = ln 2 = 0.6931471806,
    #          sum(w) = 2 + 6 + 14 = 22.
    # per study: (0.1053605157 + 0.6931471806) / 2 = 0.3992538481
    # global:    (14*0.1053605157 + 22*0.6931471806) / 36 = (1.4750472198 + 15.2492379732) / 36
    #          = 16.7242851930 / 36 = 0.4645634776
    y = np.stack([row(), row(["C1"])])
    p = np.stack([np.full(8, 0.1), np.full(8, 0.5)])
    assert per_study_loss(y, p) == pytest.approx([0.1053605157, LN2], abs=1e-9)
    assert competition_metric(y, p) == pytest.approx(0.3992538481, abs=1e-9)
    assert global_metric(y, p) == pytest.approx(0.4645634776, abs=1e-9)


def test_clipping_keeps_certain_mistakes_finite():
    y = np.stack([row(["C5"]), row()])
    wrong = 1 - y  # p = 0 where the truth is 1 and p = 1 where it is 0
    # each row costs about -ln(1e-15) = 34.5388; 1 - 1e-15 is not exact in float64 (1 minus it
    # is 0.9992e-15), so the clipped-at-1 rows cost 34.5393: hence the loose tolerance.
    clip_loss = -math.log(1e-15)
    assert competition_metric(y, wrong) == pytest.approx(clip_loss, rel=1e-4)
    assert global_metric(y, wrong) == pytest.approx(clip_loss, rel=1e-4)
    right = y.copy()
    assert 0 <= competition_metric(y, right) < 1e-12


def test_bad_inputs_are_refused():
    y = np.stack([row()])
    with pytest.raises(ValueError, match="probabilities"):
        competition_metric(y, np.full((1, 8), np.nan))
    with pytest.raises(ValueError, match="probabilities"):
        competition_metric(y, np.full((1, 8), 1.5))
    with pytest.raises(ValueError, match="shape"):
        competition_metric(y, np.full((1, 7), 0.5))
    with pytest.raises(ValueError, match="0 or 1"):
        competition_metric(np.full((1, 8), 0.5), np.full((1, 8), 0.5))
    with pytest.raises(ValueError, match="no studies"):
        competition_metric(np.zeros((0, 8)), np.zeros((0, 8)))


PREVALENCE = np.array([7.2, 14.1, 3.6, 5.3, 8.0, 13.7, 19.5]) / 100  # DESIGN.md section 2


def draw_labels(n, rng):
    """Labels like DESIGN's: 47.6% positive; 65% / 25% / 10% with one / two / three fractures,
    vertebrae chosen in proportion to their prevalence."""
    y = np.zeros((n, 8))
    positive = rng.random(n) < 0.476
    counts = rng.choice([1, 2, 3], size=n, p=[0.65, 0.25, 0.10])
    for i in np.flatnonzero(positive):
        y[i, rng.choice(7, size=counts[i], replace=False, p=PREVALENCE / PREVALENCE.sum())] = 1
        y[i, 7] = 1
    return y


def test_training_prevalence_scores_about_056():
    y = draw_labels(2019, np.random.default_rng(7))
    frame = pd.DataFrame(y.astype(int), columns=list(TARGETS))
    prior = prior_predictions(frame)
    assert prior["patient_overall"] == pytest.approx(0.476, abs=0.03)
    assert prior["C7"] == pytest.approx(0.195, abs=0.03)
    p = np.tile([prior[t] for t in TARGETS], (len(y), 1))
    assert competition_metric(y, p) == pytest.approx(0.56, abs=0.02)


# --- AUC -----------------------------------------------------------------------------------

def test_auc_hand_cases():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # tie: positive 0.5 vs negative 0.5 counts 1/2; 0.5>0.2, 0.9>0.5, 0.9>0.2 -> 3.5/4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    # three-way tie: positive 0.3 vs negatives 0.3, 0.3 = 1/2 + 1/2, vs 0.1 = 1; positive 0.7
    # beats all three: (2 + 3) / (2 * 3) = 5/6
    assert roc_auc([1, 0, 0, 1, 0], [0.3, 0.3, 0.3, 0.7, 0.1]) == pytest.approx(5 / 6)
    assert roc_auc([0, 1, 0, 1], [0.4, 0.4, 0.4, 0.4]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.9, 0.8, 0.1]) == pytest.approx(0.0)


def test_auc_one_class_is_nan():
    assert math.isnan(roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


# --- evaluate on wide frames ---------------------------------------------------------------

def wide(values, uids=UIDS):
    return pd.DataFrame(np.asarray(values), index=pd.Index(uids, name="StudyInstanceUID"),
                        columns=list(TARGETS))


def test_evaluate_aligns_on_study_and_reports_aucs():
    labels = wide(np.stack([row(), row(["C1"]), row(["C1", "C2"])]).astype(int))
    preds = wide(np.stack([np.full(8, 0.2), np.full(8, 0.6), np.full(8, 0.9)]))
    shuffled = preds.iloc[[2, 0, 1]]
    result = evaluate(labels, shuffled)
    expected = competition_metric(labels.to_numpy(), preds.to_numpy())
    assert result["metric"] == pytest.approx(expected)
    assert result["global_metric"] == pytest.approx(global_metric(labels.to_numpy(), preds.to_numpy()))
    assert result["auc_C1"] == pytest.approx(1.0)           # 0.2 < 0.6, 0.9
    assert result["auc_patient_overall"] == pytest.approx(1.0)
    assert result["auc_C2"] == pytest.approx(1.0)           # positive 0.9 beats 0.2, 0.6
    assert math.isnan(result["auc_C3"])                     # no positive C3
    assert result["auc_mean"] == pytest.approx(1.0)         # mean of the three finite AUCs
    assert set(result) == {"metric", "global_metric", "auc_mean"} | {f"auc_{t}" for t in TARGETS}


def test_evaluate_refuses_missing_studies():
    labels = wide(np.zeros((3, 8), dtype=int))
    preds = wide(np.full((2, 8), 0.5), UIDS[:2])
    with pytest.raises(ValueError, match=UIDS[2].replace(".", r"\.")):
        evaluate(labels, preds)


# --- submission files ----------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("row_id,fractured\n" + "".join(line + "\n" for line in lines))
    return path


def full_rows(uid, p=0.5):
    return [f"{uid}_{t},{p}" for t in TARGETS]


def test_submission_round_trip_is_exact_and_ordered(tmp_path):
    rng = np.random.default_rng(1)
    preds = wide(rng.random((3, 8))).iloc[[2, 0, 1]]
    preds.iloc[0, 0] = 1e-17
    path = tmp_path / "submission.csv"
    write_submission(preds, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "row_id,fractured"
    assert [line.split(",")[0] for line in lines[1:9]] == [f"{UIDS[0]}_{t}" for t in TARGETS]
    assert lines[-1].startswith(f"{UIDS[2]}_patient_overall,")
    back = read_submission(path, studies=UIDS)
    assert back.index.tolist() == UIDS and back.columns.tolist() == list(TARGETS)
    assert (back.to_numpy() == preds.loc[UIDS].to_numpy()).all()  # bit-exact
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left


def test_write_submission_refuses_bad_values_and_keeps_old_file(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(wide(np.full((3, 8), 0.5)), path)
    before = path.read_text()
    with pytest.raises(ValueError, match="probabilities"):
        write_submission(wide(np.full((3, 8), np.nan)), path)
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_submission(wide(np.full((1, 8), 0.5), ["../x"]), path)
    assert path.read_text() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_reader_refuses_missing_rows(tmp_path):
    path = write_lines(tmp_path / "s.csv", full_rows(UIDS[0]) + full_rows(UIDS[1])[:-1])
    with pytest.raises(ValueError, match=rf"1 missing row.*{UIDS[1]}_patient_overall"):
        read_submission(path)
    # a whole expected study absent: its 8 rows are named
    path = write_lines(tmp_path / "s.csv", full_rows(UIDS[0]))
    with pytest.raises(ValueError, match=rf"8 missing row\(s\) in 1 studies \({UIDS[1]}\)"):
        read_submission(path, studies=UIDS[:2])


def test_reader_refuses_duplicated_rows(tmp_path):
    path = write_lines(tmp_path / "s.csv", full_rows(UIDS[0]) + [f"{UIDS[0]}_C3,0.7"])
    with pytest.raises(ValueError, match=rf"1 duplicated row.*{UIDS[0]}_C3"):
        read_submission(path)


def test_reader_refuses_extra_studies_when_expected_given(tmp_path):
    path = write_lines(tmp_path / "s.csv", full_rows(UIDS[0]) + full_rows(UIDS[1]))
    assert read_submission(path).index.tolist() == UIDS[:2]
    with pytest.raises(ValueError, match=rf"1 unexpected studies: {UIDS[1]}"):
        read_submission(path, studies=[UIDS[0]])


@pytest.mark.parametrize("bad_id", [
    f"{UIDS[0]}_C8", f"{UIDS[0]}-C1", f"{UIDS[0]}_patient", "../x_C1", f"{UIDS[0]}_c1", "_C1",
])
def test_reader_refuses_unparseable_row_ids(tmp_path, bad_id):
    path = write_lines(tmp_path / "s.csv", full_rows(UIDS[0]) + [f"{bad_id},0.5"])
    with pytest.raises(ValueError, match="unparseable row_id.*line 10"):
        read_submission(path)


@pytest.mark.parametrize("bad_value", ["abc", "", "nan", "NaN", "-0.1", "1.0001", "inf"])
def test_reader_refuses_bad_probabilities(tmp_path, bad_value):
    lines = full_rows(UIDS[0])
    lines[3] = f"{UIDS[0]}_C4,{bad_value}"
    path = write_lines(tmp_path / "s.csv", lines)
    with pytest.raises(ValueError, match=rf"not a probability.*line 5 {UIDS[0]}_C4"):
        read_submission(path)


def test_reader_refuses_wrong_columns(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("row_id,prob\nx,0.5\n")
    with pytest.raises(ValueError, match="missing columns fractured"):
        read_submission(path)
    path.write_text(",row_id,fractured\n0," + full_rows(UIDS[0])[0] + "\n")
    with pytest.raises(ValueError, match="unexpected columns"):
        read_submission(path)


# --- labels --------------------------------------------------------------------------------

def write_labels(path, rows):
    header = "StudyInstanceUID,patient_overall," + ",".join(TARGETS[:7])
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_read_labels(tmp_path):
    path = write_labels(tmp_path / "train.csv", [f"{UIDS[1]},1,0,1,0,0,0,0,0", f"{UIDS[0]},0,0,0,0,0,0,0,0"])
    labels = read_labels(path)
    assert labels.index.tolist() == [UIDS[1], UIDS[0]]
    assert labels.columns.tolist() == list(TARGETS)
    assert labels.loc[UIDS[1]].tolist() == [0, 1, 0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("bad_row, message", [
    (f"{UIDS[1]},1,0,2,0,0,0,0,0", r"line 3: C2='2' is not 0 or 1"),
    (f"{UIDS[1]},1,0,,0,0,0,0,0", r"line 3: C2='' is not 0 or 1"),
    (f"{UIDS[1]},0.5,0,0,0,0,0,0,0", r"patient_overall='0.5'"),
    ("../x,0,0,0,0,0,0,0,0", r"invalid StudyInstanceUID '\.\./x'"),
    (f"{UIDS[0]},0,0,0,0,0,0,0,0", rf"more than once: {UIDS[0]}"),
])
def test_read_labels_refuses_bad_rows(tmp_path, bad_row, message):
    path = write_labels(tmp_path / "train.csv", [f"{UIDS[0]},0,0,0,0,0,0,0,0", bad_row])
    with pytest.raises(ValueError, match=message):
        read_labels(path)


# --- CLI -----------------------------------------------------------------------------------

@pytest.fixture
def scored_files(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", [
        f"{UIDS[0]},0,0,0,0,0,0,0,0", f"{UIDS[1]},1,1,0,0,0,0,0,0", f"{UIDS[2]},1,1,1,0,0,0,0,0",
    ])
    submission = tmp_path / "submission.csv"
    write_submission(wide(np.full((3, 8), 0.5)), submission)
    return labels, submission


def test_cli_scores_end_to_end(scored_files, capsys):
    labels, submission = scored_files
    assert cli.main(["score", str(submission), str(labels)]) == 0
    out = capsys.readouterr().out
    assert "studies                  3" in out
    assert f"metric (mean per study)  {LN2:.4f}" in out
    assert f"global metric (pooled)   {LN2:.4f}" in out
    assert "AUC C1                   0.5000" in out      # all predictions tied
    assert "AUC C3                   n/a (one class)" in out


def test_cli_refuses_partial_submission_unless_subset(scored_files, tmp_path, capsys):
    labels, _ = scored_files
    partial = tmp_path / "partial.csv"
    # study 0 all negative at 0.1; study 1 (C1 + patient) at 0.9 on its positives, 0.1 elsewhere:
    # every row's bce is -ln 0.9, so the metric is -ln 0.9 = 0.1054 whatever the weights
    truth_1 = row(["C1"])
    write_submission(wide(np.stack([np.full(8, 0.1), np.where(truth_1 == 1, 0.9, 0.1)]), UIDS[:2]),
                     partial)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(partial), str(labels)])) == 1
    assert f"missing row(s) in 1 studies ({UIDS[2]})" in capsys.readouterr().err

    assert run(parser.parse_args([str(partial), str(labels), "--subset"])) == 0
    out = capsys.readouterr().out
    assert "studies                  2" in out
    assert f"metric (mean per study)  {-math.log(0.9):.4f}" in out
    assert f"global metric (pooled)   {-math.log(0.9):.4f}" in out
    assert "AUC C1                   1.0000" in out


def test_cli_subset_refuses_unlabelled_studies(scored_files, tmp_path, capsys):
    labels, _ = scored_files
    other = tmp_path / "other.csv"
    write_submission(wide(np.full((1, 8), 0.5), ["1.2.3"]), other)
    assert cli.main(["score", str(other), str(labels), "--subset"]) == 1
    assert "1 studies are not in" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_step(scored_files):
    labels, submission = scored_files
    done = subprocess.run([sys.executable, "-m", "cspine_ray.metric", str(submission), str(labels)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"metric (mean per study)  {LN2:.4f}" in done.stdout
