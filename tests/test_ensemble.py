import numpy as np
import pandas as pd
import pytest

from pipeline.ensemble import SoftVotingEnsemble, build_submission, local_leaderboard, validate_submission
from pipeline.errors import PipelineError
from pipeline.prepare import read_submission_format

A = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
B = np.array([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
CLASSES = ["cat", "dog", "frog"]


def test_weighted_soft_vote_matches_hand_computation():
    ens = SoftVotingEnsemble(weights=[1, 3]).fit([A, B], np.array([0, 1]))
    assert ens.weights_.tolist() == [0.25, 0.75]
    expected = np.array([[0.25 * 0.6 + 0.75 * 0.1, 0.25 * 0.3 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.7],
                         [0.25 * 0.2 + 0.75 * 0.3, 0.25 * 0.5 + 0.75 * 0.3, 0.25 * 0.3 + 0.75 * 0.4]])
    np.testing.assert_allclose(ens.predict_proba([A, B]), expected)
    assert ens.predict([A, B]).tolist() == [2, 2]


def test_equal_weights_by_default():
    ens = SoftVotingEnsemble().fit([A, B], np.array([0, 1]))
    np.testing.assert_allclose(ens.predict_proba([A, B]), (A + B) / 2)


def test_estimator_contract():
    ens = SoftVotingEnsemble(weights=[2, 1])
    assert vars(ens) == {"weights": [2, 1]}  # __init__ only stores
    with pytest.raises(RuntimeError, match="not fitted"):
        ens.predict_proba([A, B])
    assert ens.fit([A, B], np.array([0, 1])) is ens
    with pytest.raises(ValueError, match="non-negative"):
        SoftVotingEnsemble(weights=[1, -1]).fit([A, B], np.array([0, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        SoftVotingEnsemble().fit([A, B[:1]], np.array([0, 1]))


def _sample(kind):
    if kind == "label":
        return pd.DataFrame({"image": ["x2", "x1"], "breed": ["cat", "cat"]})
    return pd.DataFrame({"image": ["x2", "x1"], "frog": 0.0, "cat": 0.0, "dog": 0.0})


def test_label_submission_maps_back_to_original_labels():
    sample = _sample("label")
    fmt = read_submission_format(sample, CLASSES, "sample_submission.csv")
    sub = build_submission(["x2", "x1"], A, CLASSES, fmt)
    assert sub.to_dict("list") == {"image": ["x2", "x1"], "breed": ["cat", "dog"]}
    validate_submission(sub, sample, CLASSES, fmt)


def test_probability_submission_follows_the_sample_columns():
    sample = _sample("probabilities")
    fmt = read_submission_format(sample, CLASSES, "sample_submission.csv")
    sub = build_submission(["x2", "x1"], A, CLASSES, fmt)
    assert list(sub.columns) == ["image", "frog", "cat", "dog"]
    assert sub["frog"].tolist() == [0.1, 0.3] and sub["cat"].tolist() == [0.6, 0.2]
    validate_submission(sub, sample, CLASSES, fmt)


def test_validation_rejects_wrong_order_missing_rows_and_unknown_labels():
    sample = _sample("label")
    fmt = read_submission_format(sample, CLASSES, "sample_submission.csv")
    good = build_submission(["x2", "x1"], A, CLASSES, fmt)
    with pytest.raises(PipelineError, match="row 2: ids differ"):
        validate_submission(good.iloc[::-1], sample, CLASSES, fmt)
    with pytest.raises(PipelineError, match="ids differ"):
        validate_submission(good.iloc[:1], sample, CLASSES, fmt)
    with pytest.raises(PipelineError, match="row 3: label is not a class"):
        validate_submission(good.assign(breed=["cat", "wolf"]), sample, CLASSES, fmt)
    with pytest.raises(PipelineError, match="columns"):
        validate_submission(good.rename(columns={"breed": "label"}), sample, CLASSES, fmt)


def test_sample_with_unknown_columns_is_rejected():
    with pytest.raises(PipelineError, match="sample_submission.csv: columns \\['wolf'\\]"):
        read_submission_format(pd.DataFrame({"id": [1], "cat": [0], "wolf": [0]}), CLASSES, "sample_submission.csv")


def test_local_leaderboard_accuracy():
    answers = pd.DataFrame({"id": ["x1", "x2", "x3"], "label": ["dog", "cat", "frog"]})
    probs = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])  # cat, dog, frog
    assert local_leaderboard(answers, ["x2", "x1", "x3"], probs, CLASSES) == pytest.approx(1.0)
    assert local_leaderboard(answers, ["x1", "x2", "x3"], probs, CLASSES) == pytest.approx(1 / 3)
